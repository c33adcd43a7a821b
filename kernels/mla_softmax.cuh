// The decode's online softmax of one 64-token page, for a math warpgroup that holds the page's
// scores as an m64n64 wgmma accumulator (32 floats per thread: rows row0 and row0 + 8, 16
// columns each). Log2 domain; a row's max is kept until a page would push its P past
// 2^RESCALE_THRESHOLD_LOG2 (v26); each page is first tried against the kept max with no page
// max at all (v28); a share of the exponentials runs as a polynomial on the FMA pipe (v26).
#pragma once
#include "mla_decode_shared.cuh"

// Softmax knobs (A/B by -D; the defaults are what ships, NOTES.md "v26": together +3-4% on the
// compute rows of an H200; the polynomial alone -1%, since the rescale then fills the FMA pipe).
#ifndef RESCALE_THRESHOLD_LOG2
#define RESCALE_THRESHOLD_LOG2 8.f  // keep a row's running max until a page raises it by more
#endif
#ifndef EXP2_ON_FMA_PER_8
#define EXP2_ON_FMA_PER_8 2         // of every 8 exponentials, this many by polynomial on the FMA pipe
#endif
#ifndef SOFTMAX_TREE
#define SOFTMAX_TREE 1              // row max and sum as trees of depth 4, not chains of 16 (v28)
#endif
#ifndef SPECULATIVE_MAX
#define SPECULATIVE_MAX 1           // exponentials against the kept max first, the page max only if they overflow (v28)
#endif
constexpr float RESCALE_THRESHOLD = RESCALE_THRESHOLD_LOG2;
// SPECULATIVE_MAX keeps a page's exponentials against the kept max while a thread's 16 P of each
// row sum to at most this: every P then stays within the bound a raise keeps (fp16 ends at 2^16).
constexpr float KEPT_MAX_P_LIMIT = float(1 << int(RESCALE_THRESHOLD_LOG2));
constexpr int EXP2_ON_FMA = EXP2_ON_FMA_PER_8;
static_assert(EXP2_ON_FMA >= 0 && EXP2_ON_FMA <= 8, "EXP2_ON_FMA_PER_8 must be in 0..8");

// This thread's 16 scores of row half `half` (0: row0, 1: row0 + 8) are s[4n + 2 half + j],
// n < 8, j < 2 (the accumulator fragment layout, frag_col).
template <typename Op>
DEVICE float reduce_row_half(const float (&s)[32], int half, Op op) {
#if SOFTMAX_TREE
    float t[8];
#pragma unroll
    for (int n = 0; n < 8; ++n) t[n] = op(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]);
#pragma unroll
    for (int width = 4; width >= 1; width /= 2)
#pragma unroll
        for (int n = 0; n < width; ++n) t[n] = op(t[n], t[n + width]);
    return t[0];
#else
    float r = op(s[2 * half], s[2 * half + 1]);
#pragma unroll
    for (int n = 1; n < 8; ++n) r = op(op(r, s[4 * n + 2 * half]), s[4 * n + 2 * half + 1]);
    return r;
#endif
}

struct MaxOp { DEVICE float operator()(float x, float y) const { return fmaxf(x, y); } };
struct SumOp { DEVICE float operator()(float x, float y) const { return x + y; } };

// s[i] <- 2^(s[i] * scale_log2 - m) for this thread's 16 scores of row half `half`; returns their sum.
DEVICE float exp2_row_half(float (&s)[32], int half, float scale_log2, float m) {
#pragma unroll
    for (int i = 0; i < 32; ++i)
        if (((i >> 1) & 1) == half) {
            const float x = s[i] * scale_log2 - m;
            // The polynomial's exponent field wraps past 2^127, and a kept max can sit far
            // below a new score: clamped, such a P still fails the sum test.
            s[i] = (i % 8) < EXP2_ON_FMA ? exp2_on_fma_pipe(SPECULATIVE_MAX ? fminf(x, 64.f) : x) : exp2f(x);
        }
    return reduce_row_half(s, half, SumOp{});
}

// Online softmax of one page's scores in the log2 domain: s becomes P, row_max / row_sum are
// updated and alpha gets each row's rescale factor for O. Row sums stay per-thread until the
// end. A row's max moves only when a page raises it by more than RESCALE_THRESHOLD (P then stays
// below 2^threshold), so that most pages leave alpha = 1 and skip the rescale of O.
DEVICE void online_softmax_page(float (&s)[32], float (&row_max)[2], float (&row_sum)[2],
                                float (&alpha)[2], float scale_log2) {
#if SPECULATIVE_MAX
    // First against each row's kept max, with no page max (a reduction and two shuffle rounds
    // before the first exponential). Done unless a row of this warp needs the page max: a raise,
    // P summing past the limit, or a row with no key yet (every piece's first page). Kept as one
    // block: in a helper, or with the first page sent straight to the page max, the compiler
    // copied P between registers on every page, 3% slower (NOTES.md "v28").
    {
        float p[32], sum[2];
        bool redo = false;
#pragma unroll
        for (int i = 0; i < 32; ++i) p[i] = s[i];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            sum[half] = exp2_row_half(p, half, scale_log2, row_max[half]);
            redo |= row_max[half] == NEG_INF || !(sum[half] <= KEPT_MAX_P_LIMIT);
        }
        if (!__any_sync(0xffffffffu, redo)) {
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = p[i];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                alpha[half] = 1.f;
                row_sum[half] += sum[half];
            }
            return;
        }
    }
#endif
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float mx = reduce_row_half(s, half, MaxOp{});
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float page_max = mx * scale_log2;
        const bool raise = page_max > row_max[half] + RESCALE_THRESHOLD;
        const float m_new = raise ? page_max : row_max[half];
        const float m_use = m_new == NEG_INF ? 0.f : m_new;
        alpha[half] = raise ? exp2f(row_max[half] - m_use) : 1.f;
        row_max[half] = m_new;
        row_sum[half] = row_sum[half] * alpha[half] + exp2_row_half(s, half, scale_log2, m_use);
    }
}
