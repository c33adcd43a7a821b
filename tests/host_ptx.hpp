// The decode's Hopper PTX (kernels/ptx_helpers.cuh: mbarriers, TMA, cp.async, wgmma, stmatrix,
// named barriers) emulated on host_simt.hpp, so that the shipped decode runs on a machine without
// a GPU (tests/test_decode_host.py). Functional, not timed, but the asynchronous operations
// complete late, as on the GPU, so that a missing wait shows: a TMA box lands (and completes its
// bytes on the mbarrier) a few scheduling rounds after its issue; a thread's cp.async lands at
// its cp.async.wait_all or mbarrier arrive; a wgmma is one operation of its warpgroup, started
// when its last thread issues it and completed at the first wait that retires it, where the
// shared memory it read must be unchanged (exit 6 otherwise). Wrong addresses, layouts,
// descriptors, masks, hand-offs that never complete (a deadlock) and wrong arithmetic show too,
// and so does a missing proxy fence after the emulated generic writers (cp.async, stmatrix).
//
// Shared memory: the CTA's dynamic shared memory is a 1024-aligned host buffer and a "shared
// address" is the offset into it. The 128B swizzle is a function of that address (16-byte
// chunk bits 4-6 XOR row bits 7-9), as TMA writes it and wgmma reads it.
// Tensor maps: the harness encodes its own 4-D map into the 128 opaque bytes (HostTensorMap).
#pragma once

#include <array>
#include <deque>
#include <map>
#include <memory>

#define SIMT_DEFERRED_COPIES
#include "host_simt.hpp"

#define __grid_constant__
#define __align__(n) alignas(n)

namespace ptx {

inline unsigned char* smem_base() { return simt::current_cta->dynamic_smem; }
inline unsigned char* at(uint32_t addr) { return smem_base() + addr; }
inline uint32_t swizzle_128b(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// Generic-proxy writes that the async proxy (wgmma reads, TMA writes) may not see until the
// writing thread's fence.proxy.async: the emulated writers (a cp.async landing, stmatrix) mark
// their 16-byte granules with the writer, its fence clears them, and a wgmma reading or a TMA
// box landing on a marked granule stops the run (exit 8). The kernels' plain C++ stores (e.g.
// zero_v_tail's) are not seen.
inline std::vector<int> unfenced;                       // per granule: writer + 1, or 0
inline std::vector<std::vector<uint32_t>> unfenced_by;  // per thread: the granules it marked

inline void mark_generic_write(uint32_t addr) {
    unfenced[addr / 16] = simt::current_thread + 1;
    unfenced_by[simt::current_thread].push_back(addr / 16);
}
inline void check_async_access(uint32_t addr, const char* what) {
    if (const int writer = unfenced[addr / 16]) {
        std::fprintf(stderr, "ptx: %s shared address %u, which thread %d wrote through the generic proxy "
                     "without a fence.proxy.async since\n", what, addr, writer - 1);
        std::exit(8);
    }
}

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
        const uint32_t addr = swizzle_128b(logical);
        check_async_access(addr, "a wgmma reads");
        uint16_t bits;
        std::memcpy(&bits, at(addr), 2);
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

// A wgmma is one operation of the warpgroup: it starts when the last of its 128 threads has
// issued it (reading shared memory then) and completes, for all of them, when the first thread's
// wgmma.wait retires it; shared memory it reads must not change in between (checked by computing
// every thread's product again at completion). Each thread's accumulators take its product when
// that thread's own wait retires the group.
struct PendingMma {
    float* d;
    bool accumulate;
    std::function<std::vector<float>()> compute;
    std::vector<float> product;  // set when the warpgroup's last thread issued it
    bool completed = false;
};
using MmaRef = std::shared_ptr<PendingMma>;
struct ThreadMmas {
    long long issued = 0;                  // wgmma instructions so far (the warpgroup's sequence)
    std::vector<MmaRef> open;              // since the last commit
    std::deque<std::vector<MmaRef>> committed;  // groups, oldest first
};
inline std::vector<ThreadMmas> mmas;                              // per thread of the CTA
inline std::map<std::pair<int, long long>, std::vector<MmaRef>> warpgroup_mmas;  // (warpgroup, sequence)

// A B for this thread's accumulators (REGS of them): A(row, k) and B(k, col) over one k16.
template <int REGS, typename A, typename B>
std::vector<float> product_k16(const A& a, const B& b, int thread) {
    std::vector<float> out(REGS);
    const int saved = simt::current_thread;
    simt::current_thread = thread;  // acc_row / acc_col of the issuing thread
    for (int i = 0; i < REGS; ++i) {
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += a(acc_row(i), k) * b(k, acc_col(i));
        out[i] = sum;
    }
    simt::current_thread = saved;
    return out;
}

template <int REGS, typename A, typename B>
void mma_k16(float* d, bool accumulate, A a, B b) {
    const int thread = simt::current_thread;
    ThreadMmas& t = mmas[thread];
    auto op = std::make_shared<PendingMma>(PendingMma{d, accumulate, [a, b, thread] { return product_k16<REGS>(a, b, thread); }});
    t.open.push_back(op);
    std::vector<MmaRef>& all = warpgroup_mmas[{thread / 128, t.issued++}];
    all.push_back(op);
    if (all.size() == 128)  // the last warp issued: the operation starts
        for (const MmaRef& each : all) each->product = each->compute();
}

inline void retire_oldest_group() {
    ThreadMmas& t = mmas[simt::current_thread];
    const long long first_seq = t.issued - (long long)t.open.size() -
                                [&] { long long n = 0; for (const auto& g : t.committed) n += (long long)g.size(); return n; }();
    long long seq = first_seq;
    for (const MmaRef& op : t.committed.front()) {
        const std::pair<int, long long> key{simt::current_thread / 128, seq++};
        while (op->product.empty()) {  // not started: another warp has not issued it yet
            simt::yield();
        }
        auto found = warpgroup_mmas.find(key);
        if (found != warpgroup_mmas.end()) {  // the first wait of the warpgroup: the operation completes
            for (const MmaRef& each : found->second) {
                const std::vector<float> again = each->compute();  // bit for bit: NaN from a masked key is no change
                if (std::memcmp(again.data(), each->product.data(), again.size() * sizeof(float)) != 0) {
                    std::fprintf(stderr, "ptx: shared memory under an in-flight wgmma (%zu accumulators a thread) "
                                 "changed before the first wgmma.wait of its warpgroup\n", again.size());
                    std::exit(6);
                }
            }
            warpgroup_mmas.erase(found);
        }
        for (size_t i = 0; i < op->product.size(); ++i) op->d[i] = (op->accumulate ? op->d[i] : 0.f) + op->product[i];
    }
    t.committed.pop_front();
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

// A TMA box on its way: its bytes (read at issue) land in shared memory, and complete their
// transaction bytes on the mbarrier, when `rounds` reaches 0.
struct PendingTma {
    int rounds;
    std::vector<std::pair<uint32_t, uint16_t>> elements;  // (shared address, value)
    uint32_t bar;
    long long bytes;
};
constexpr int TMA_LATENCY_ROUNDS = 3;
inline std::vector<PendingTma> tmas;
inline std::vector<std::vector<std::pair<uint32_t, std::array<unsigned char, 16>>>> copies;  // per thread: cp.async

void land_tma(const PendingTma& t);

inline bool advance_async() {
    for (size_t i = 0; i < tmas.size();) {
        if (--tmas[i].rounds > 0) { ++i; continue; }
        const PendingTma done = std::move(tmas[i]);
        tmas.erase(tmas.begin() + long(i));
        land_tma(done);
    }
    return !tmas.empty();
}

inline void land_copies() {
    for (const auto& [addr, bytes] : copies[simt::current_thread]) {
        std::memcpy(at(addr), bytes.data(), 16);
        mark_generic_write(addr);
    }
    copies[simt::current_thread].clear();
}

inline void reset_cta(simt::Cta& cta) {
    mbarriers.clear();
    named_barriers.clear();
    tmas.clear();
    mmas.assign(cta.threads, ThreadMmas{});
    warpgroup_mmas.clear();
    copies.assign(cta.threads, {});
    unfenced.assign(cta.smem_storage.size() / 16 + 1, 0);
    unfenced_by.assign(cta.threads, {});
}

inline void check_cta_end(simt::Cta& cta) {
    for (int t = 0; t < cta.threads; ++t) {
        if (!mmas[t].open.empty() || !mmas[t].committed.empty()) {
            std::fprintf(stderr, "ptx: thread %d exited with a wgmma never waited for\n", t);
            std::exit(6);
        }
        if (!copies[t].empty()) {
            std::fprintf(stderr, "ptx: thread %d exited with a cp.async never waited for\n", t);
            std::exit(6);
        }
    }
    if (!tmas.empty()) {
        std::fprintf(stderr, "ptx: the CTA exited with %zu TMA boxes in flight\n", tmas.size());
        std::exit(6);
    }
}

inline const bool installed = (simt::on_cta_start = reset_cta, simt::on_round = advance_async,
                               simt::on_cta_end = check_cta_end, true);

inline void land_tma(const PendingTma& t) {
    for (const auto& [addr, value] : t.elements) {
        check_async_access(addr, "a TMA box lands on");
        std::memcpy(at(addr), &value, 2);
    }
    MBarrier& b = mbarrier_at(t.bar);
    b.tx -= t.bytes;
    ++simt::progress;
    b.settle();
}

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
// cp.async: the 16 bytes are read at issue and land at the thread's wait_all (or arrive).
inline void cp_async_16_or_zero(void* dst, const void* src, bool valid) {
    std::array<unsigned char, 16> bytes{};
    if (valid) std::memcpy(bytes.data(), src, 16);
    ptx::copies[simt::current_thread].emplace_back(smem_addr(dst), bytes);
}
inline void cp_async_16(void* dst, const void* src) { cp_async_16_or_zero(dst, src, true); }
inline void cp_async_wait_all() { ptx::land_copies(); }
inline void cp_async_arrive(uint64_t* bar) {  // .noinc: one of the expected arrivals, after the copies
    ptx::land_copies();
    mbarrier_arrive(bar);
}
inline void fence_proxy_async_smem() {
    for (const uint32_t granule : ptx::unfenced_by[simt::current_thread])
        if (ptx::unfenced[granule] == simt::current_thread + 1) ptx::unfenced[granule] = 0;
    ptx::unfenced_by[simt::current_thread].clear();
}
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

// One 4-D box into 128B-swizzled shared memory, landing TMA_LATENCY_ROUNDS scheduling rounds
// later; coordinates out of range read zeros.
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
    ptx::PendingTma box{ptx::TMA_LATENCY_ROUNDS, {}, smem_addr(bar),
                        (long long)(map.box[0] * map.box[1] * map.box[2] * map.box[3] * 2)};
    ptx::mbarrier_at(box.bar);  // an uninitialised barrier fails now, not when the box lands
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
                    box.elements.emplace_back(ptx::swizzle_128b(dst_addr + row * 128 + uint32_t(i0) * 2), value);
                }
    ptx::tmas.push_back(std::move(box));
}

inline void wgmma_fence() {}
inline void wgmma_commit() {
    ptx::ThreadMmas& t = ptx::mmas[simt::current_thread];
    t.committed.push_back(std::move(t.open));
    t.open.clear();
}
// Retiring takes a few scheduling rounds, in which the other threads go on (a producer that
// refills a stage too early lands its box under the wgmma, and the retirement sees it).
constexpr int WGMMA_LATENCY_ROUNDS = 2;
template <int N>
void wgmma_wait() {
    if (ptx::mmas[simt::current_thread].committed.size() <= size_t(N)) return;
    for (int round = 0; round < WGMMA_LATENCY_ROUNDS; ++round) {
        ++simt::progress;  // waiting out a latency is not a deadlock
        simt::yield();
    }
    while (ptx::mmas[simt::current_thread].committed.size() > size_t(N)) ptx::retire_oldest_group();
}
template <int N>
void fence_accumulators(float (&)[N]) {}
template <int N>
void fence_fragments(uint32_t (&)[N]) {}

// D[64x64] (+)= A B, both K-major in smem: S = Q K^T.
inline void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const ptx::Operand a(desc_a, false), b(desc_b, false);
    ptx::mma_k16<32>(d, accumulate != 0, [=](int m, int k) { return a(m, k); }, [=](int k, int n) { return b(n, k); });
}
inline void wgmma_m64n64k16_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                               uint64_t desc_b, int accumulate) {
    const ptx::RegisterA a(a0, a1, a2, a3);
    const ptx::Operand b(desc_b, false);
    ptx::mma_k16<32>(d, accumulate != 0, a, [=](int k, int n) { return b(n, k); });
}
// D[64x256] += A B, A K-major in smem (P), B MN-major (V): O += P V.
inline void wgmma_m64n256k16_ss_bt(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    const ptx::Operand a(desc_a, false), b(desc_b, true);
    ptx::mma_k16<128>(d, true, [=](int m, int k) { return a(m, k); }, [=](int k, int n) { return b(n, k); });
}
inline void wgmma_m64n256k16_rs_bt(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                   uint64_t desc_b) {
    const ptx::RegisterA a(a0, a1, a2, a3);
    const ptx::Operand b(desc_b, true);
    ptx::mma_k16<128>(d, true, a, [=](int k, int n) { return b(n, k); });
}

// D[64 x N] (+)= A B with the query rows on N (benchmarks/kernel_versions' heads-on-N decodes):
// B K-major; A K-major (TRANS_A = 0, S^T = K Q^T) or MN-major (TRANS_A = 1, O^T += V^T P^T).
template <int TRANS_A>
void wgmma_m64n16k16_ss(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const ptx::Operand a(desc_a, TRANS_A != 0), b(desc_b, false);
    ptx::mma_k16<8>(d, accumulate != 0, [=](int m, int k) { return a(m, k); }, [=](int k, int n) { return b(n, k); });
}
template <int TRANS_A>
void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const ptx::Operand a(desc_a, TRANS_A != 0), b(desc_b, false);
    ptx::mma_k16<16>(d, accumulate != 0, [=](int m, int k) { return a(m, k); }, [=](int k, int n) { return b(n, k); });
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
    ptx::mark_generic_write(row_addr);
}

// The same with each matrix stored transposed: lane L writes row L % 8 of the transpose of
// matrix L / 8, i.e. that matrix's column L % 8.
inline void stmatrix_x4_trans(uint32_t row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    const ptx::WarpMatrices m(r0, r1, r2, r3);
    const int lane = simt::current_thread % 32;
    uint16_t elements[8];
    for (int row = 0; row < 8; ++row) elements[row] = m(lane / 8, row, lane % 8);
    std::memcpy(ptx::at(row_addr), elements, 16);
    ptx::mark_generic_write(row_addr);
}
