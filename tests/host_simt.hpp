// A small host emulation of the CUDA execution model, for running the kernels on a machine
// without a GPU (tests/host_kernels.py builds them with it; host_ptx.hpp adds the decode's Hopper
// PTX). Every thread of a CTA is a fiber (ucontext) on one OS thread, switched only where it
// waits: at __syncthreads and named barriers, and in every warp intrinsic (an exchange through
// the warp's slots between two warp barriers). CTAs run one after another. A round in which no
// fiber makes progress is reported as a deadlock (exit 4), e.g. lanes that skip a full-mask
// intrinsic the others reach. Float32 denormals are flushed, as under the kernels' -ftz=true.
// Only what the kernels use is provided; a kernel that needs more fails to compile, naming it.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__
#define __launch_bounds__(...)
#define __shared__ static  // one CTA runs at a time: a function-level static is its shared memory
#define DEVICE inline
#define POS_INF INFINITY
#define NEG_INF (-INFINITY)

constexpr float LN2 = 0.69314718055994530942f;

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

namespace simt {

void yield();
inline unsigned long progress = 0;  // arrivals and finished fibers: a round without any is a deadlock

// A reusable barrier for `count` fibers: the last to arrive opens the next generation.
struct Barrier {
    int count, arrived = 0;
    unsigned long generation = 0;
    explicit Barrier(int n) : count(n) {}
    // Arrives; returns the generation to wait for the end of.
    unsigned long arrive() {
        const unsigned long g = generation;
        ++progress;
        if (++arrived == count) {
            arrived = 0;
            ++generation;
        }
        return g;
    }
    void wait() {
        const unsigned long g = arrive();
        while (generation == g) yield();
    }
};

struct Warp {
    Barrier barrier{32};
    uint64_t slots[32];
};

constexpr size_t STACK_BYTES = 64 * 1024;

struct Cta {
    dim3 block_idx, grid_dim, block_dim;
    int threads;
    Barrier barrier;
    std::vector<Warp> warps;
    std::vector<unsigned char> smem_storage;
    unsigned char* dynamic_smem;  // 1024-byte aligned, as the kernels' swizzled tiles need
    int vote = 0;
    Cta(dim3 b, dim3 g, dim3 d, size_t smem)
        : block_idx(b), grid_dim(g), block_dim(d), threads(int(d.x * d.y * d.z)), barrier(threads),
          warps((threads + 31) / 32), smem_storage(smem + 1024),
          dynamic_smem(smem_storage.data() + (1024 - reinterpret_cast<uintptr_t>(smem_storage.data()) % 1024) % 1024) {}
};

inline Cta* current_cta = nullptr;
inline int current_thread = 0;
inline ucontext_t scheduler_context;
inline std::vector<ucontext_t> fiber_contexts;
inline std::vector<char> fiber_done;
inline const std::function<void()>* current_kernel = nullptr;
inline std::function<void(Cta&)> on_cta_start;  // run before each CTA's threads (host_ptx.hpp's reset)
// Run after every scheduling round (host_ptx.hpp lands its delayed copies there); returns whether
// anything is still in flight, which counts as progress.
inline std::function<bool()> on_round;
inline std::function<void(Cta&)> on_cta_end;  // after the CTA's threads returned (host_ptx.hpp's checks)

inline void yield() { swapcontext(&fiber_contexts[current_thread], &scheduler_context); }

inline void fiber_entry() {
    (*current_kernel)();
    fiber_done[current_thread] = 1;
    ++progress;
}  // returns to uc_link: the scheduler

inline dim3 thread_idx() {
    const dim3 d = current_cta->block_dim;
    return {unsigned(current_thread % d.x), unsigned(current_thread / d.x % d.y), unsigned(current_thread / (d.x * d.y))};
}

// The kernels are built with -ftz=true: float32 denormals flush to zero, as inputs and results.
// The softmax relies on it (a masked score's polynomial 2^x is a denormal pattern that must sum
// to 0), so the host does the same. Every fiber's context is taken after this, so they inherit it.
inline void flush_denormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
#elif defined(__aarch64__)
    __builtin_aarch64_set_fpcr(__builtin_aarch64_get_fpcr() | (1u << 24));  // FPCR.FZ
#else
#error "host_simt.hpp: no flush-to-zero control for this CPU"
#endif
}

// Every CTA of `grid` with `block` threads, one CTA at a time; each thread runs `kernel`.
inline void launch(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& kernel) {
    flush_denormals();
    const int threads = int(block.x * block.y * block.z);
    std::vector<std::vector<char>> stacks(threads, std::vector<char>(STACK_BYTES));
    current_kernel = &kernel;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                Cta cta({x, y, z}, grid, block, dynamic_smem);
                current_cta = &cta;
                if (on_cta_start) on_cta_start(cta);
                fiber_contexts.assign(threads, ucontext_t{});
                fiber_done.assign(threads, 0);
                for (int t = 0; t < threads; ++t) {
                    getcontext(&fiber_contexts[t]);
                    fiber_contexts[t].uc_stack.ss_sp = stacks[t].data();
                    fiber_contexts[t].uc_stack.ss_size = STACK_BYTES;
                    fiber_contexts[t].uc_link = &scheduler_context;
                    makecontext(&fiber_contexts[t], fiber_entry, 0);
                }
                for (int live = threads; live > 0;) {  // round robin until every fiber returned
                    const unsigned long before = progress;
                    live = 0;
                    for (int t = 0; t < threads; ++t) {
                        if (fiber_done[t]) continue;
                        current_thread = t;
                        swapcontext(&scheduler_context, &fiber_contexts[t]);
                        live += !fiber_done[t];
                    }
                    const bool in_flight = on_round && on_round();
                    if (live > 0 && progress == before && !in_flight) {
                        std::fprintf(stderr, "simt: deadlock in CTA (%u, %u, %u): %d threads wait at barriers "
                                     "the others never reach\n", x, y, z, live);
                        std::exit(4);
                    }
                }
                if (on_cta_end) on_cta_end(cta);
            }
}

template <typename T>
T* dynamic_smem() { return reinterpret_cast<T*>(current_cta->dynamic_smem); }

// All 32 lanes put `value` in their slots; each reads lane `source(lane)`'s.
template <typename T, typename Source>
T exchange(T value, Source source) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "one slot per lane");
    Warp& warp = current_cta->warps[current_thread / 32];
    const int lane = current_thread % 32;
    std::memcpy(&warp.slots[lane], &value, sizeof(T));
    warp.barrier.wait();
    T got;
    std::memcpy(&got, &warp.slots[source(lane) & 31], sizeof(T));
    warp.barrier.wait();
    return got;
}

// Every lane's `value`, as all 32 lanes put it (each lane gets the whole warp's).
template <typename T>
std::vector<T> gather(T value) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "one slot per lane");
    Warp& warp = current_cta->warps[current_thread / 32];
    std::memcpy(&warp.slots[current_thread % 32], &value, sizeof(T));
    warp.barrier.wait();
    std::vector<T> all(32);
    for (int lane = 0; lane < 32; ++lane) std::memcpy(&all[lane], &warp.slots[lane], sizeof(T));
    warp.barrier.wait();
    return all;
}

}  // namespace simt

#define threadIdx (simt::thread_idx())
#define blockIdx (simt::current_cta->block_idx)
#define gridDim (simt::current_cta->grid_dim)
#define blockDim (simt::current_cta->block_dim)

inline void __syncthreads() { simt::current_cta->barrier.wait(); }

inline int __syncthreads_or(int predicate) {
    simt::Cta& cta = *simt::current_cta;
    __syncthreads();  // the previous vote has been read by everyone
    if (simt::current_thread == 0) cta.vote = 0;
    __syncthreads();
    if (predicate) cta.vote = 1;
    __syncthreads();
    return cta.vote;
}

template <typename T>
T __shfl_sync(unsigned, T value, int source) {
    return simt::exchange(value, [source](int) { return source; });
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
    return simt::exchange(value, [mask](int lane) { return lane ^ mask; });
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
    return simt::exchange(value, [delta](int lane) { return lane >= int(delta) ? lane - int(delta) : lane; });
}
inline int __reduce_max_sync(unsigned, int value) {
    int result = value;
    for (int got : simt::gather(value)) result = got > result ? got : result;
    return result;
}

inline int atomicMax(int* address, int value) {  // fibers switch only at barriers: no race
    const int old = *address;
    if (value > old) *address = value;
    return old;
}

inline int __any_sync(unsigned, int predicate) {
    int any = 0;
    for (int got : simt::gather(predicate)) any |= got != 0;
    return any;
}
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

// The PTX helpers the host-tested kernel code uses (kernels/ptx_helpers.cuh), for the host.
inline void allow_dependent_launch() {}
inline void grid_dependency_wait() {}  // CTAs run after the kernel before them
#ifndef SIMT_DEFERRED_COPIES  // host_ptx.hpp defers them to the waits instead
// cp.async completes at once here (the waits and fences that follow have nothing to do).
inline void cp_async_16(void* dst, const void* src) { std::memcpy(dst, src, 16); }
inline void cp_async_16_or_zero(void* dst, const void* src, bool valid) {
    if (valid) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
}
#endif

// Round to nearest even, as cvt.rn does; NaN stays NaN.
inline uint16_t to_half_bits(float x) {
#ifdef MLA_FP16
    const _Float16 h = static_cast<_Float16>(x);  // round to nearest even
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    return bits;
#else
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
inline uint32_t pack_half2(float lo, float hi) {
    return uint32_t(to_half_bits(lo)) | (uint32_t(to_half_bits(hi)) << 16);
}

inline float warp_reduce_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline float warp_reduce_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

namespace simt {
// A harness buffer between two inaccessible pages, its last element against the second: a
// kernel's read or write past either end faults (the harness dies on SIGSEGV), a host-side
// memcheck for global memory.
template <typename T>
class Guarded {
public:
    explicit Guarded(size_t count, T fill = T{}) : count_(count) {
        const size_t page = size_t(sysconf(_SC_PAGESIZE)), bytes = count * sizeof(T);
        mapped_ = (bytes + page - 1) / page * page + 2 * page;
        base_ = static_cast<unsigned char*>(mmap(nullptr, mapped_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (base_ == MAP_FAILED || mprotect(base_ + page, mapped_ - 2 * page, PROT_READ | PROT_WRITE) != 0) {
            std::perror("simt::Guarded");
            std::exit(7);
        }
        data_ = reinterpret_cast<T*>(base_ + mapped_ - page - bytes);
        for (size_t i = 0; i < count; ++i) data_[i] = fill;
    }
    ~Guarded() { munmap(base_, mapped_); }
    Guarded(const Guarded&) = delete;
    Guarded& operator=(const Guarded&) = delete;
    T* data() { return data_; }
    const T* data() const { return data_; }
    size_t size() const { return count_; }
    T& operator[](size_t i) { return data_[i]; }

private:
    size_t count_, mapped_;
    unsigned char* base_;
    T* data_;
};
}  // namespace simt

// Harness I/O: whole arrays (std::vector or simt::Guarded) from stdin and to stdout.
template <typename Array>
bool read_all(Array& v) { return std::fread(v.data(), sizeof(v.data()[0]), v.size(), stdin) == v.size(); }
template <typename Array>
void write_all(const Array& v) { std::fwrite(v.data(), sizeof(v.data()[0]), v.size(), stdout); }
