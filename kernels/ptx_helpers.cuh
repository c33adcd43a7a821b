// Small named wrappers around the Hopper (sm_90a) PTX that the MLA kernels use:
// mbarriers, TMA tile loads, wgmma and its shared-memory descriptors, named barriers,
// proxy fences and packed float -> 16-bit conversion.
// Self-contained on purpose: no CUDA headers, so NVRTC compiles it in well under a second
// and a CPU-only machine can compile it through the nvrtc wheel alone.
#pragma once

#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "flashmla_backend kernels need the sm_90a target (wgmma, TMA, mbarrier): compile with -arch=sm_90a"
#endif

typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef unsigned char uint8_t;

// The 16-bit element type of q, the KV cache and out. MLA_FP16 selects fp16, else bf16.
#ifdef MLA_FP16
#define MLA_WGMMA_TYPE "f16"
#define MLA_CVT_TYPE "f16x2"
#define MLA_CVT1_TYPE "f16"
#else
#define MLA_WGMMA_TYPE "bf16"
#define MLA_CVT_TYPE "bf16x2"
#define MLA_CVT1_TYPE "bf16"
#endif

#define DEVICE __device__ __forceinline__

// Shared headers declare constants that not every kernel uses.
#pragma nv_diag_suppress 177

#define POS_INF __int_as_float(0x7f800000)
#define NEG_INF __int_as_float(0xff800000)
constexpr float LN2 = 0.69314718055994530942f;

// ---------------------------------------------------------------------------------------
// Address helpers
DEVICE uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------------
// mbarrier: TMA completion ("full") and consumer release ("empty") signals.
DEVICE void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals));
}

// Makes mbarrier.init visible to the async proxy (TMA) before first use.
DEVICE void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

DEVICE void mbarrier_arrive(uint64_t* bar) {
    asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}"
                 ::"r"(smem_addr(bar)) : "memory");
}

DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}"
                 ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Spins until the phase with the given parity has completed.
DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n"
        " .reg .pred done;\n"
        " WAIT_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra WAIT_%=;\n"
        "}" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

// The GPU's global nanosecond timer (the same on every SM): for phase traces across CTAs.
DEVICE uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// ---------------------------------------------------------------------------------------
// TMA: one 4-D tile (64 columns x 1 head x 64 tokens x 1 page) into 128B-swizzled smem.
DEVICE uint64_t l2_policy_evict_first() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

DEVICE uint64_t l2_policy_evict_last() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

DEVICE void tma_load_4d(void* dst, const void* tensor_map, uint64_t* bar,
                        int c0, int c1, int c2, int c3, uint64_t l2_policy) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;"
        ::"r"(smem_addr(dst)), "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
          "r"(smem_addr(bar)), "l"(l2_policy)
        : "memory");
}

// The 5-D load of benchmarks/read_ceiling.py's group-major page boxes (v41, run 34).
DEVICE void tma_load_5d(void* dst, const void* tensor_map, uint64_t* bar, int c0, int c1, int c2,
                        int c3, int c4, uint64_t l2_policy) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3, %4, %5, %6}], [%7], %8;"
        ::"r"(smem_addr(dst)), "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
          "r"(smem_addr(bar)), "l"(l2_policy)
        : "memory");
}

// cp.async: 16 bytes global -> shared, cached in L2 only (pages are read once per CTA).
DEVICE void cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

// The same, or 16 zero bytes when !valid (a source size of 0 reads nothing).
DEVICE void cp_async_16_or_zero(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0) : "memory");
}

// Waits until every cp.async this thread issued has landed.
DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// One arrival on bar once all of this thread's earlier cp.async have landed (the barrier's
// expected count includes it: .noinc).
DEVICE void cp_async_arrive(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// ---------------------------------------------------------------------------------------
// Fences and named barriers
// Generic-proxy smem writes (st.shared) must be fenced before wgmma/TMA (async proxy) read them.
DEVICE void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

DEVICE void named_barrier_sync(uint32_t id, uint32_t threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

DEVICE void named_barrier_arrive(uint32_t id, uint32_t threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Programmatic dependent launch: a kernel launched with programmatic stream serialization
// may start while the previous kernel on its stream still runs; it waits here, before its
// first read of that kernel's results, until that kernel has completed and flushed. Returns
// at once for an ordinary launch.
DEVICE void grid_dependency_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Lets the next kernel on the stream, if launched programmatically, be scheduled now rather
// than when this CTA exits (it still waits in grid_dependency_wait for this grid's results).
DEVICE void allow_dependent_launch() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// wgmma shared-memory matrix descriptors, 128-byte swizzle.
// Smem tiles are stored as 64-column chunks: a chunk is 64 rows x 128 bytes, swizzled in
// 8-row (1024-byte) atoms, exactly as TMA writes them with CU_TENSOR_MAP_SWIZZLE_128B.
constexpr uint32_t SWIZZLE_ATOM_BYTES = 1024;  // 8 rows x 128 bytes

DEVICE uint64_t make_smem_desc(uint32_t addr, uint32_t leading_bytes, uint32_t stride_bytes) {
    uint64_t desc = 0;
    desc |= (uint64_t)((addr & 0x3FFFF) >> 4);
    desc |= (uint64_t)((leading_bytes & 0x3FFFF) >> 4) << 16;
    desc |= (uint64_t)((stride_bytes & 0x3FFFF) >> 4) << 32;
    desc |= (uint64_t)1 << 62;  // 128-byte swizzle
    return desc;
}

// K-major operand (rows of 64 K-elements per chunk): the leading offset is unused.
DEVICE uint64_t desc_k_major(uint32_t addr) {
    return make_smem_desc(addr, 16, SWIZZLE_ATOM_BYTES);
}

// MN-major operand (V read as [tokens, dims]): 64-element MN blocks lie chunk_bytes apart,
// 8-token K groups one atom apart.
DEVICE uint64_t desc_mn_major(uint32_t addr, uint32_t chunk_bytes) {
    return make_smem_desc(addr, chunk_bytes, SWIZZLE_ATOM_BYTES);
}

// The descriptor of an operand `bytes` past one whose descriptor is known. The start address
// field is the low 14 bits (addr >> 4), and no shared-memory address reaches 2^18, so the add
// never carries out of it: one add per wgmma operand instead of rebuilding (and, shift, or) the
// descriptor from the address (v29).
DEVICE uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

#ifndef WGMMA_DESC_BY_OFFSET
#define WGMMA_DESC_BY_OFFSET 0  // v29 knob: operand descriptors by desc_advance from a base
#endif

// A swizzled shared-memory operand tile; at(bytes) is the descriptor of the K slice `bytes` in.
// MN_CHUNK_BYTES = 0: K-major; otherwise MN-major with 64-element MN blocks that far apart.
template <uint32_t MN_CHUNK_BYTES = 0>
struct SmemOperand {
    uint32_t addr;
    uint64_t desc;
    DEVICE static uint64_t desc_of(uint32_t a) {
        return MN_CHUNK_BYTES == 0 ? desc_k_major(a) : desc_mn_major(a, MN_CHUNK_BYTES);
    }
    DEVICE explicit SmemOperand(uint32_t a) : addr(a), desc(desc_of(a)) {}
    DEVICE uint64_t at(uint32_t bytes) const {
        return WGMMA_DESC_BY_OFFSET ? desc_advance(desc, bytes) : desc_of(addr + bytes);
    }
};

// ---------------------------------------------------------------------------------------
// wgmma issue / ordering
DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
DEVICE void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Keeps the compiler from moving accumulator registers across an async wgmma.
template <int N>
DEVICE void fence_accumulators(float (&acc)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

// The same for the packed A fragments of a register-sourced wgmma: keeps them live (unchanged)
// until the wait that retires it.
template <int N>
DEVICE void fence_fragments(uint32_t (&frag)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(frag[i])::"memory");
}

#define MLA_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                    "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// The 32 accumulator operands %0..%31 of an m64n64 wgmma, as its D list.
#define MLA_D32                                                                                 \
    " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                    \
    "  %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"

// D[64x64] (+)= A[64x16] * B[16x64]; A and B K-major in smem. Scores S = Q K^T.
DEVICE void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n64k16.f32." MLA_WGMMA_TYPE "." MLA_WGMMA_TYPE "\n"
        MLA_D32
        " %32, %33, p, 1, 1, 0, 0;\n}"
        : MLA_ACC8(0), MLA_ACC8(8), MLA_ACC8(16), MLA_ACC8(24)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// The same with A from registers (a0..a3: this warp's 16 rows of the k16 slice in the mma
// A-fragment layout, as ldmatrix_x4 returns it); B K-major in smem.
DEVICE void wgmma_m64n64k16_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                               uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n64k16.f32." MLA_WGMMA_TYPE "." MLA_WGMMA_TYPE "\n"
        MLA_D32
        " {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}"
        : MLA_ACC8(0), MLA_ACC8(8), MLA_ACC8(16), MLA_ACC8(24)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate));
}

// Four 8x8 16-bit matrices from smem, one row address per lane (lanes 8j..8j+7: matrix j).
DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row_addr)));
}

// Four 8x8 16-bit matrices into smem, one row address per lane (lanes 8j..8j+7: matrix j);
// register j holds this lane's two elements of matrix j in the accumulator-fragment layout.
DEVICE void stmatrix_x4(uint32_t row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
                 ::"r"(row_addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// The same, each matrix stored transposed: lane L gives the address of row L % 8 of matrix L / 8
// of the transpose (column L % 8 of what the registers hold), 16 contiguous bytes.
DEVICE void stmatrix_x4_trans(uint32_t row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
                 ::"r"(row_addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// D[64x16] / D[64x32] (+)= A[64x16] * B[16xN] with the query rows on N, for few rows per KV
// head (v5, rejected: `git show efdf8d6^:benchmarks/kernel_versions/mla_decode_v5_heads_on_n.cu`;
// kept for the heads-on-N designs in NOTES.md). B is K-major; A is K-major
// (TRANS_A = 0: scores S^T = K Q^T) or MN-major (TRANS_A = 1: O^T += V^T P^T, V read
// straight from the K tile).
template <int TRANS_A>
DEVICE void wgmma_m64n16k16_ss(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %10, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n16k16.f32." MLA_WGMMA_TYPE "." MLA_WGMMA_TYPE "\n"
        " {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, 0;\n}"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A));
}

template <int TRANS_A>
DEVICE void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %18, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n32k16.f32." MLA_WGMMA_TYPE "." MLA_WGMMA_TYPE "\n"
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},"
        " %16, %17, p, 1, 1, %19, 0;\n}"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A));
}

// The 128 accumulator operands %0..%127 of an m64n256 wgmma, as its D list.
#define MLA_D128                                                                                \
    " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"         \
    " %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34,"     \
    " %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51,"     \
    " %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68,"     \
    " %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85,"     \
    " %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101,"        \
    " %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115,"      \
    " %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127},"

// D[64x256] += A[64x16] * B[16x256]; A K-major (P), B MN-major (V) in smem. O += P V.
DEVICE void wgmma_m64n256k16_ss_bt(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." MLA_WGMMA_TYPE "." MLA_WGMMA_TYPE "\n"
        MLA_D128
        " %128, %129, 1, 1, 1, 0, 1;"
        : MLA_ACC8(0), MLA_ACC8(8), MLA_ACC8(16), MLA_ACC8(24), MLA_ACC8(32), MLA_ACC8(40),
          MLA_ACC8(48), MLA_ACC8(56), MLA_ACC8(64), MLA_ACC8(72), MLA_ACC8(80), MLA_ACC8(88),
          MLA_ACC8(96), MLA_ACC8(104), MLA_ACC8(112), MLA_ACC8(120)
        : "l"(desc_a), "l"(desc_b));
}

// D[64x256] += A[64x16] * B[16x256]; A from registers (a0..a3: this thread's packed 16-bit
// pairs of the k16 slice, the layout of two adjacent n8 accumulator blocks), B MN-major (V).
DEVICE void wgmma_m64n256k16_rs_bt(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                   uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." MLA_WGMMA_TYPE "." MLA_WGMMA_TYPE "\n"
        MLA_D128
        " {%128, %129, %130, %131}, %132, 1, 1, 1, 1;"
        : MLA_ACC8(0), MLA_ACC8(8), MLA_ACC8(16), MLA_ACC8(24), MLA_ACC8(32), MLA_ACC8(40),
          MLA_ACC8(48), MLA_ACC8(56), MLA_ACC8(64), MLA_ACC8(72), MLA_ACC8(80), MLA_ACC8(88),
          MLA_ACC8(96), MLA_ACC8(104), MLA_ACC8(112), MLA_ACC8(120)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b));
}

#undef MLA_ACC8
#undef MLA_D32
#undef MLA_D128

// ---------------------------------------------------------------------------------------
// One float -> one 16-bit element (round to nearest), as raw bits.
DEVICE uint16_t to_half_bits(float x) {
    uint16_t bits;
    asm("cvt.rn." MLA_CVT1_TYPE ".f32 %0, %1;" : "=h"(bits) : "f"(x));
    return bits;
}

// Two floats -> two packed 16-bit elements (round to nearest), low half = lo.
DEVICE uint32_t pack_half2(float lo, float hi) {
    uint32_t packed;
    asm("cvt.rn." MLA_CVT_TYPE ".f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

DEVICE float warp_reduce_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

DEVICE float warp_reduce_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
