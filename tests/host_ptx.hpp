// The decode's Hopper PTX (kernels/ptx_helpers.cuh: mbarriers, TMA, cp.async, wgmma, stmatrix,
// named barriers) emulated on host_simt.hpp, so that the shipped decode runs on a machine without
// a GPU (tests/test_decode_host.py). Functional, not timed: every asynchronous operation
// completes when it is issued (a TMA load, a cp.async, a wgmma), so a missing wait or fence is
// not caught here; wrong addresses, layouts, descriptors, masks, hand-offs that never complete
// (a deadlock) and wrong arithmetic are.
//
// Shared memory: the CTA's dynamic shared memory is a 1024-aligned host buffer and a "shared
// address" is the offset into it. The 128B swizzle is a function of that address (16-byte
// chunk bits 4-6 XOR row bits 7-9), as TMA writes it and wgmma reads it.
// Tensor maps: the harness encodes its own 4-D map into the 128 opaque bytes (HostTensorMap).
#pragma once

#include <map>
#include <memory>

#include "host_simt.hpp"

#define __grid_constant__
#define __align__(n) alignas(n)

namespace ptx {

inline unsigned char* smem_base() { return simt::current_cta->dynamic_smem; }
inline unsigned char* at(uint32_t addr) { return smem_base() + addr; }
inline uint32_t swizzle_128b(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// An mbarrier: pending arrivals and transaction bytes of the current phase, and how many phases
// have completed.
struct MBarrier {
    int expected = 0, pending = 0;
    long long tx = 0;
    unsigned completed = 0;
    void settle() {
        if (pending == 0 && tx == 0) {
            ++completed;
            pending = expected;
        }
    }
};

inline std::map<uint32_t, MBarrier> mbarriers;             // by shared address, per CTA
inline std::map<uint32_t, std::unique_ptr<simt::Barrier>> named_barriers;  // by id, per CTA

inline MBarrier& mbarrier_at(uint32_t addr) {
    auto found = mbarriers.find(addr);
    if (found == mbarriers.end()) {
        std::fprintf(stderr, "ptx: mbarrier at shared address %u used before mbarrier.init\n", addr);
        std::exit(5);
    }
    return found->second;
}

// What the harness puts in a TensorMap's 128 bytes: a 4-D tiled map with the 128B swizzle.
struct HostTensorMap {
    uint64_t base;
    uint64_t dims[4];
    uint64_t strides[3];  // bytes, of dims 1-3
    uint64_t box[4];
    uint64_t magic;
};
constexpr uint64_t HOST_TENSOR_MAP_MAGIC = 0x7e45a9f1c0ffee11ull;

inline void reset_cta(simt::Cta&) {
    mbarriers.clear();
    named_barriers.clear();
}
inline const bool installed = (simt::on_cta_start = reset_cta, true);

// A wgmma shared-memory operand from its descriptor: element (mn, k) of a K-major operand
// (rows of 64 K-elements per 128-byte row, 8-row atoms `stride` apart) or of an MN-major one
// (64-element MN blocks `leading` apart, 8-row K groups `stride` apart).
struct Operand {
    uint32_t start, leading, stride;
    bool mn_major;
    explicit Operand(uint64_t desc, bool mn) {
        start = uint32_t(desc & 0x3FFF) << 4;
        leading = uint32_t((desc >> 16) & 0x3FFF) << 4;
        stride = uint32_t((desc >> 32) & 0x3FFF) << 4;
        mn_major = mn;
        if ((desc >> 62) != 1) {
            std::fprintf(stderr, "ptx: wgmma descriptor without the 128B swizzle\n");
            std::exit(5);
        }
    }
    float operator()(int mn, int k) const {
        const uint32_t logical = mn_major
            ? start + (mn / 64) * leading + (k / 8) * stride + (k % 8) * 128 + (mn % 64) * 2
            : start + (mn / 8) * stride + (mn % 8) * 128 + k * 2;
        uint16_t bits;
        std::memcpy(&bits, at(swizzle_128b(logical)), 2);
        return half_bits_to_float(bits);
    }
    static float half_bits_to_float(uint16_t bits) {
#ifdef MLA_FP16
        _Float16 h;
        std::memcpy(&h, &bits, 2);
        return float(h);
#else
        const uint32_t u = uint32_t(bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
#endif
    }
};

// This thread's row and column of accumulator register i (kernels' frag_row / frag_col).
inline int acc_row(int i) { return (simt::current_thread % 128) / 32 * 16 + (simt::current_thread % 32) / 4 + 8 * ((i >> 1) & 1); }
inline int acc_col(int i) { return 8 * (i >> 2) + 2 * (simt::current_thread % 4) + (i & 1); }

// D (+)= A B for this thread's accumulators (N / 2 of them): A(row, k) and B(k, col) over one k16.
template <int REGS, typename A, typename B>
void mma_k16(float* d, bool accumulate, A a, B b) {
    for (int i = 0; i < REGS; ++i) {
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += a(acc_row(i), k) * b(k, acc_col(i));
        d[i] = (accumulate ? d[i] : 0.f) + sum;
    }
}

// The A rows of a register-sourced wgmma: the quad's four lanes hold rows row0 and row0 + 8 of
// the k16 slice (a0: row0, k 2t..2t+1; a1: row0 + 8; a2, a3: the same at k + 8).
struct RegisterA {
    float rows[2][16];
    RegisterA(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3) {
        const auto lo = simt::gather(uint64_t(a0) | (uint64_t(a1) << 32));
        const auto hi = simt::gather(uint64_t(a2) | (uint64_t(a3) << 32));
        const int quad = simt::current_thread % 32 / 4 * 4;
        for (int t = 0; t < 4; ++t)
            for (int half = 0; half < 2; ++half)
                for (int j = 0; j < 2; ++j) {
                    rows[half][2 * t + j] = element(uint32_t(lo[quad + t] >> (32 * half)), j);
                    rows[half][8 + 2 * t + j] = element(uint32_t(hi[quad + t] >> (32 * half)), j);
                }
    }
    static float element(uint32_t packed, int j) { return Operand::half_bits_to_float(uint16_t(packed >> (16 * j))); }
    float operator()(int row, int k) const { return rows[(row % 16) >= 8][k]; }
};

}  // namespace ptx

// ---- the helpers of kernels/ptx_helpers.cuh, on the host ----
inline uint32_t smem_addr(const void* p) {
    return uint32_t(static_cast<const unsigned char*>(p) - ptx::smem_base());
}
inline uint64_t global_timer_ns() { return 0; }
inline long long clock64() { return 0; }
inline uint64_t l2_policy_evict_first() { return 0; }
inline uint64_t l2_policy_evict_last() { return 0; }

inline void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
    ptx::MBarrier& b = ptx::mbarriers[smem_addr(bar)];
    b = ptx::MBarrier{};
    b.expected = b.pending = int(arrivals);
}
inline void fence_barrier_init() {}
inline void mbarrier_arrive(uint64_t* bar) {
    ptx::MBarrier& b = ptx::mbarrier_at(smem_addr(bar));
    --b.pending;
    ++simt::progress;
    b.settle();
}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    ptx::MBarrier& b = ptx::mbarrier_at(smem_addr(bar));
    b.tx += bytes;
    --b.pending;
    ++simt::progress;
    b.settle();
}
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
    while ((ptx::mbarrier_at(smem_addr(bar)).completed & 1u) == parity) simt::yield();
}
inline void cp_async_wait_all() {}
inline void cp_async_arrive(uint64_t* bar) { mbarrier_arrive(bar); }  // .noinc: one of the expected
inline void fence_proxy_async_smem() {}
inline void named_barrier_sync(uint32_t id, uint32_t threads) {
    auto& slot = ptx::named_barriers[id];
    if (!slot) slot.reset(new simt::Barrier(int(threads)));
    slot->wait();
}
inline void named_barrier_arrive(uint32_t id, uint32_t threads) {
    auto& slot = ptx::named_barriers[id];
    if (!slot) slot.reset(new simt::Barrier(int(threads)));
    slot->arrive();
}

// One 4-D box into 128B-swizzled shared memory; coordinates out of range read zeros.
inline void tma_load_4d(void* dst, const void* tensor_map, uint64_t* bar, int c0, int c1, int c2, int c3,
                        uint64_t) {
    ptx::HostTensorMap map;
    std::memcpy(&map, tensor_map, sizeof(map));
    if (map.magic != ptx::HOST_TENSOR_MAP_MAGIC) {
        std::fprintf(stderr, "ptx: tma_load_4d with a map the harness did not encode\n");
        std::exit(5);
    }
    const uint32_t dst_addr = smem_addr(dst);
    const long long coord[4] = {c0, c1, c2, c3};
    uint32_t row = 0;
    for (uint64_t i3 = 0; i3 < map.box[3]; ++i3)
        for (uint64_t i2 = 0; i2 < map.box[2]; ++i2)
            for (uint64_t i1 = 0; i1 < map.box[1]; ++i1, ++row)
                for (uint64_t i0 = 0; i0 < map.box[0]; ++i0) {
                    const long long at[4] = {coord[0] + (long long)i0, coord[1] + (long long)i1,
                                             coord[2] + (long long)i2, coord[3] + (long long)i3};
                    uint16_t value = 0;
                    bool inside = true;
                    for (int d = 0; d < 4; ++d) inside &= at[d] >= 0 && at[d] < (long long)map.dims[d];
                    if (inside) {
                        const uint64_t offset = at[0] * 2 + at[1] * map.strides[0] + at[2] * map.strides[1] +
                                                at[3] * map.strides[2];
                        std::memcpy(&value, reinterpret_cast<const unsigned char*>(map.base) + offset, 2);
                    }
                    std::memcpy(ptx::at(ptx::swizzle_128b(dst_addr + row * 128 + uint32_t(i0) * 2)), &value, 2);
                }
    ptx::MBarrier& b = ptx::mbarrier_at(smem_addr(bar));
    b.tx -= (long long)(map.box[0] * map.box[1] * map.box[2] * map.box[3] * 2);
    ++simt::progress;
    b.settle();
}

inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int N>
void wgmma_wait() {}
template <int N>
void fence_accumulators(float (&)[N]) {}
template <int N>
void fence_fragments(uint32_t (&)[N]) {}

// D[64x64] (+)= A B, both K-major in smem: S = Q K^T.
inline void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const ptx::Operand a(desc_a, false), b(desc_b, false);
    ptx::mma_k16<32>(d, accumulate != 0, [&](int m, int k) { return a(m, k); }, [&](int k, int n) { return b(n, k); });
}
inline void wgmma_m64n64k16_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                               uint64_t desc_b, int accumulate) {
    const ptx::RegisterA a(a0, a1, a2, a3);
    const ptx::Operand b(desc_b, false);
    ptx::mma_k16<32>(d, accumulate != 0, a, [&](int k, int n) { return b(n, k); });
}
// D[64x256] += A B, A K-major in smem (P), B MN-major (V): O += P V.
inline void wgmma_m64n256k16_ss_bt(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    const ptx::Operand a(desc_a, false), b(desc_b, true);
    ptx::mma_k16<128>(d, true, [&](int m, int k) { return a(m, k); }, [&](int k, int n) { return b(n, k); });
}
inline void wgmma_m64n256k16_rs_bt(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                   uint64_t desc_b) {
    const ptx::RegisterA a(a0, a1, a2, a3);
    const ptx::Operand b(desc_b, true);
    ptx::mma_k16<128>(d, true, a, [&](int k, int n) { return b(n, k); });
}

// D[64 x N] (+)= A B with the query rows on N (benchmarks/kernel_versions' heads-on-N decodes):
// B K-major; A K-major (TRANS_A = 0, S^T = K Q^T) or MN-major (TRANS_A = 1, O^T += V^T P^T).
template <int TRANS_A>
void wgmma_m64n16k16_ss(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const ptx::Operand a(desc_a, TRANS_A != 0), b(desc_b, false);
    ptx::mma_k16<8>(d, accumulate != 0, [&](int m, int k) { return a(m, k); }, [&](int k, int n) { return b(n, k); });
}
template <int TRANS_A>
void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const ptx::Operand a(desc_a, TRANS_A != 0), b(desc_b, false);
    ptx::mma_k16<16>(d, accumulate != 0, [&](int m, int k) { return a(m, k); }, [&](int k, int n) { return b(n, k); });
}

namespace ptx {
// The four 8x8 16-bit matrices a warp's stmatrix.x4 holds: element (row, col) of matrix j is
// half col % 2 of register j of lane 4 row + col / 2.
struct WarpMatrices {
    std::vector<uint64_t> lo, hi;  // every lane's registers 0 | 1 << 32 and 2 | 3 << 32
    WarpMatrices(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3)
        : lo(simt::gather(uint64_t(r0) | (uint64_t(r1) << 32))), hi(simt::gather(uint64_t(r2) | (uint64_t(r3) << 32))) {}
    uint16_t operator()(int matrix, int row, int col) const {
        const uint64_t pair = (matrix < 2 ? lo : hi)[4 * row + col / 2];
        return uint16_t(pair >> (32 * (matrix % 2) + 16 * (col % 2)));
    }
};
}  // namespace ptx

// Four 8x8 16-bit matrices into smem: lane L gives the address of row L % 8 of matrix L / 8 and
// writes that row's 16 bytes.
inline void stmatrix_x4(uint32_t row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    const ptx::WarpMatrices m(r0, r1, r2, r3);
    const int lane = simt::current_thread % 32;
    uint16_t elements[8];
    for (int col = 0; col < 8; ++col) elements[col] = m(lane / 8, lane % 8, col);
    std::memcpy(ptx::at(row_addr), elements, 16);
}

// The same with each matrix stored transposed: lane L writes row L % 8 of the transpose of
// matrix L / 8, i.e. that matrix's column L % 8.
inline void stmatrix_x4_trans(uint32_t row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    const ptx::WarpMatrices m(r0, r1, r2, r3);
    const int lane = simt::current_thread % 32;
    uint16_t elements[8];
    for (int row = 0; row < 8; ++row) elements[row] = m(lane / 8, row, lane % 8);
    std::memcpy(ptx::at(row_addr), elements, 16);
}
