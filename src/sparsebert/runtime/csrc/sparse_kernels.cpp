// The sparse CPU kernels of sparsebert.runtime, for feature-major activations (see kernels.py for why that
// layout). Built on first use by sparsebert/runtime/build.py with g++ -O3 -march=native -fopenmp, loaded
// through ctypes: every extern "C" function below has its ctypes signature declared there, so a change of
// signature here needs the same change there. SPARSEBERT_KERNELS_STRICT=1 builds with -Werror.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <omp.h>
#ifdef __AVX512F__
// GCC before 13 warns "'__Y' may be used uninitialized" inside its own AVX-512 header: the intrinsics pass
// _mm512_undefined_ps() (deliberately self-initialised) as the merge source of an all-lanes mask, which
// is never read (GCC bug 105593). The pragma covers only that header's text, never the code below.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

// 16 floats read or written at any float's address (rows of X start at any token). Macros, not functions:
// a function taking or returning a v16 by value would pass it under another ABI without AVX-512 than with
// it (GCC's -Wpsabi), although, inlined, it never crosses a call.
#define LOAD16(p) (*reinterpret_cast<const v16u*>(p))
#define STORE16(p, v) (*reinterpret_cast<v16u*>(p) = (v))

// One output row, NV*16 consecutive tokens: y = init + sum_p val[p] * X[idx[p], :] (+ res).
template <int NV>
static inline void row_block(const int32_t* __restrict idx, const float* __restrict val, int64_t p0, int64_t p1,
                             const float* __restrict X, int64_t ldx, float init,
                             const float* __restrict res, float* __restrict y) {
    v16 acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = v16{} + init;
    for (int64_t p = p0; p < p1; ++p) {
        const float v = val[p];
        const float* x = X + (int64_t)idx[p] * ldx;
        for (int j = 0; j < NV; ++j) acc[j] += v * LOAD16(x + 16 * j);
    }
    if (res) for (int j = 0; j < NV; ++j) acc[j] += LOAD16(res + 16 * j);
    for (int j = 0; j < NV; ++j) STORE16(y + 16 * j, acc[j]);
}

static inline void row_tail(const int32_t* idx, const float* val, int64_t p0, int64_t p1, const float* X,
                            int64_t ldx, float init, const float* res, float* y, int64_t w) {
    float acc[16];
    for (int64_t j = 0; j < w; ++j) acc[j] = init;
    for (int64_t p = p0; p < p1; ++p) {
        const float v = val[p];
        const float* x = X + (int64_t)idx[p] * ldx;
        for (int64_t j = 0; j < w; ++j) acc[j] += v * x[j];
    }
    for (int64_t j = 0; j < w; ++j) y[j] = acc[j] + (res ? res[j] : 0.0f);
}

// Widest register block that still fits the remaining tokens of this row.
#define STEP(NV)                                                                                 \
    if (w - j >= 16 * (NV)) {                                                                    \
        row_block<NV>(indices, values, p0, p1, x + j, ldx, b, res ? res + j : nullptr, y + j);   \
        j += 16 * (NV);                                                                          \
    }

// A thread's scratch of at least n elements of T, 64-byte aligned, kept between calls and grown as needed; Slot
// tells apart the buffers of one element type that a thread holds at once.
enum Slot { PACKED, SCORES };
template <typename T, Slot S>
static T* thread_buffer(int64_t n) {
    static thread_local T* buf = nullptr;
    static thread_local int64_t cap = 0;
    if (n > cap) {
        std::free(buf);
        cap = n;
        buf = static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64));
    }
    return buf;
}

// A thread's copy of X's columns [n0, n0 + w) as a contiguous (K, w) block (X's rows ld apart). Without it,
// each non-zero reads w values from a row ld away from the last: at thousands of tokens every read lands on
// another page, and the walk through X's rows, not the arithmetic, sets the pace.
template <typename T>
static const T* pack_block(const T* X, int64_t K, int64_t ld, int64_t n0, int64_t w) {
    T* buf = thread_buffer<T, PACKED>(K * w);
    for (int64_t k = 0; k < K; ++k) std::memcpy(buf + k * w, X + k * ld + n0, w * sizeof(T));
    return buf;
}

// The rows [lo, hi) of the calling OpenMP thread: an equal share of the row pointer's total (non-zeros,
// blocks or pairs), so that threads get equal work however the rows vary.
static inline void thread_rows(const int32_t* indptr, int64_t M, int64_t* lo, int64_t* hi) {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t total = indptr[M];
    *lo = std::lower_bound(indptr, indptr + M, (int32_t)((total * t) / T)) - indptr;
    *hi = t == T - 1 ? M : std::lower_bound(indptr, indptr + M, (int32_t)((total * (t + 1)) / T)) - indptr;
}

extern "C" {

// Y[M, N] = W[M, K] @ X[K, N] + bias[:, None] (+ R[M, N]); W in CSR (int32 indptr/indices, fp32 values).
// Rows are split between threads by non-zero count; each thread walks token blocks outer and its rows
// inner, so the block of X (packed contiguous when X is wider than one block) stays in cache while the
// thread's rows reuse it.
void spmm_csr_f32(int64_t M, int64_t N, int64_t K, const int32_t* indptr, const int32_t* indices,
                  const float* values, const float* X, const float* bias, const float* R, float* Y, int64_t BLOCK,
                  int nthreads) {
#ifndef __AVX512F__
    BLOCK = std::min<int64_t>(BLOCK, 128);  // 16 accumulators of 16 floats would spill on 16 AVX2 registers
#endif
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        thread_rows(indptr, M, &lo, &hi);
        for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
            const int64_t w = std::min(BLOCK, N - n0);
            const bool packed = w < N && hi > lo;
            const float* x = packed ? pack_block(X, K, N, n0, w) : X + n0;
            const int64_t ldx = packed ? w : N;
            for (int64_t m = lo; m < hi; ++m) {
                const int64_t p0 = indptr[m], p1 = indptr[m + 1];
                const float b = bias ? bias[m] : 0.0f;
                const float* res = R ? R + m * N + n0 : nullptr;
                float* y = Y + m * N + n0;
                int64_t j = 0;
                STEP(16) STEP(8) STEP(4) STEP(2) STEP(1)
                if (w - j > 0) row_tail(indices, values, p0, p1, x + j, ldx, b, res ? res + j : nullptr, y + j,
                                        w - j);
            }
        }
    }
}

// x rounded to bf16 (nearest even), as bits: the LayerNorm's bf16 copy, portable C++ that GCC vectorises.
static inline uint16_t bf16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// LayerNorm over the feature axis of a feature-major X[H, N] (each column is one token); with Yb, also a
// bf16 copy of the result for the bf16 engine's next product (Yb[H, NP], its padding tokens zeroed).
void layer_norm_fm_f32(int64_t H, int64_t N, const float* X, const float* gamma, const float* beta, float eps,
                       float* Y, uint16_t* Yb, int64_t NP, int nthreads) {
    const int64_t BLOCK = 64;
    const int64_t nblocks = (N + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t n0 = blk * BLOCK, w = std::min(BLOCK, N - n0);
        float mean[BLOCK], var[BLOCK];
        for (int64_t j = 0; j < w; ++j) { mean[j] = 0.0f; var[j] = 0.0f; }
        for (int64_t k = 0; k < H; ++k) {
            const float* x = X + k * N + n0;
            for (int64_t j = 0; j < w; ++j) mean[j] += x[j];
        }
        for (int64_t j = 0; j < w; ++j) mean[j] /= (float)H;
        for (int64_t k = 0; k < H; ++k) {
            const float* x = X + k * N + n0;
            for (int64_t j = 0; j < w; ++j) { const float d = x[j] - mean[j]; var[j] += d * d; }
        }
        for (int64_t j = 0; j < w; ++j) var[j] = 1.0f / std::sqrt(var[j] / (float)H + eps);
        for (int64_t k = 0; k < H; ++k) {
            const float* x = X + k * N + n0;
            float* y = Y + k * N + n0;
            const float g = gamma[k], bt = beta[k];
            for (int64_t j = 0; j < w; ++j) y[j] = (x[j] - mean[j]) * var[j] * g + bt;
            if (!Yb) continue;
            uint16_t* yb = Yb + k * NP + n0;
            for (int64_t j = 0; j < w; ++j) yb[j] = bf16_bits(y[j]);
            if (blk == nblocks - 1) std::memset(yb + w, 0, (NP - N) * sizeof(uint16_t));
        }
    }
}

}  // extern "C": the helpers below are templates

#ifdef __AVX512F__
// e^x, 16 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, 2^n by scalef);
// inputs clamped to where float's e^x is finite or underflows to 0. The attention it serves is tested
// against a float64 reference (tests/test_runtime.py).
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.9720840454f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// The lanes of a vector of 16 that hold data, when ``left`` (1 or more) remain.
static inline __mmask16 live16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// a0[v] = sum_t x0[t * xs] * Y[t * ys + 16 v], a1 the same with x1: two rows of scalars, each broadcast
// against one row of NV vectors per step. Both products of attention have this shape (below); Y's rows are
// read under the lane masks, or (ALIGNED: the chunk's own scores) whole, from 64-byte aligned rows.
template <int NV, bool ALIGNED>
static inline void two_rows(const float* x0, const float* x1, int64_t xs, const float* Y, int64_t ys, int64_t T,
                            const __mmask16* live, __m512* a0, __m512* a1) {
    for (int v = 0; v < NV; ++v) a0[v] = a1[v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
        const __m512 b0 = _mm512_set1_ps(x0[t * xs]), b1 = _mm512_set1_ps(x1[t * xs]);
        for (int v = 0; v < NV; ++v) {
            const __m512 y = ALIGNED ? _mm512_load_ps(Y + t * ys + 16 * v)
                                     : _mm512_maskz_loadu_ps(live[v], Y + t * ys + 16 * v);
            a0[v] = _mm512_fmadd_ps(b0, y, a0[v]);
            a1[v] = _mm512_fmadd_ps(b1, y, a1[v]);
        }
    }
}

// The scores of keys j and j + 1 (none when j + 1 = S) against a chunk of queries from their dot products:
// scaled, plus the key's mask and this head's bias (key-major, or null), into rows j, j + 1 of P (16 * NV wide).
template <int NV>
static inline void store_scores(const __m512* a0, const __m512* a1, int64_t j, int64_t S, float scale,
                                const float* mask, const float* bias, int64_t i0, const __mmask16* live, float* P) {
    const int64_t j1 = j + 1 < S ? j + 1 : j;
    const __m512 s = _mm512_set1_ps(scale);
    const __m512 m0 = _mm512_set1_ps(mask ? mask[j] : 0.0f), m1 = _mm512_set1_ps(mask ? mask[j1] : 0.0f);
    for (int v = 0; v < NV; ++v) {
        __m512 b0 = m0, b1 = m1;
        if (bias) {
            b0 = _mm512_add_ps(b0, _mm512_maskz_loadu_ps(live[v], bias + j * S + i0 + 16 * v));
            b1 = _mm512_add_ps(b1, _mm512_maskz_loadu_ps(live[v], bias + j1 * S + i0 + 16 * v));
        }
        _mm512_store_ps(P + j * 16 * NV + 16 * v, _mm512_fmadd_ps(a0[v], s, b0));
        if (j + 1 < S) _mm512_store_ps(P + (j + 1) * 16 * NV + 16 * v, _mm512_fmadd_ps(a1[v], s, b1));
    }
}

// One chunk of up to 16 * NV queries [i0, i0 + w) of one (sequence, head). P holds the scores transposed,
// key-major (row j: key j against every query of the chunk), so the softmax over keys runs lane-wise
// (16 queries per vector, no horizontal reduction) and the context product reads each key's row whole.
// Bias: this head's additive (S keys, S queries) table, key-major like P (MPNet's relative positions), or null.
template <int NV>
static void attention_chunk(int64_t S, int64_t D, int64_t N, const float* Q, const float* K, const float* V,
                            const float* mask, const float* bias, float scale, float* C, int64_t i0, int64_t w,
                            float* P) {
    const int64_t LD = 16 * NV;
    __mmask16 live[NV];
    for (int v = 0; v < NV; ++v) live[v] = live16(w - 16 * v);
    for (int64_t j = 0; j < S; j += 2) {  // scores of keys j and j + 1 (a copy of j when S is odd)
        const int64_t j1 = j + 1 < S ? j + 1 : j;
        __m512 a0[NV], a1[NV];
        two_rows<NV, false>(K + j, K + j1, N, Q + i0, N, D, live, a0, a1);  // over d: K[d, j] Q[d, queries]
        store_scores<NV>(a0, a1, j, S, scale, mask, bias, i0, live, P);
    }
    __m512 inv[NV];
    for (int v = 0; v < NV; ++v) {  // softmax over keys, lane-wise; the 1 / sum is applied to the context
        __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; ++j) m = _mm512_max_ps(m, _mm512_load_ps(P + j * LD + 16 * v));
        for (int64_t j = 0; j < S; ++j) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(P + j * LD + 16 * v), m));
            _mm512_store_ps(P + j * LD + 16 * v, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[v] = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
    }
    for (int64_t d = 0; d < D; d += 2) {  // context rows d and d + 1: sum_j V[d, j] P[j, :]
        const int64_t d1 = d + 1 < D ? d + 1 : d;
        __m512 a0[NV], a1[NV];
        two_rows<NV, true>(V + d * N, V + d1 * N, 1, P, LD, S, live, a0, a1);  // over j: V[d, j] P[j, queries]
        for (int v = 0; v < NV; ++v) {
            _mm512_mask_storeu_ps(C + d * N + i0 + 16 * v, live[v], _mm512_mul_ps(a0[v], inv[v]));
            if (d + 1 < D) _mm512_mask_storeu_ps(C + d1 * N + i0 + 16 * v, live[v], _mm512_mul_ps(a1[v], inv[v]));
        }
    }
}
// attention_chunk for 1..8 vectors of queries, by the count a chunk needs.
static void (*const CHUNKS[8])(int64_t, int64_t, int64_t, const float*, const float*, const float*, const float*,
                               const float*, float, float*, int64_t, int64_t, float*) = {
    attention_chunk<1>, attention_chunk<2>, attention_chunk<3>, attention_chunk<4>,
    attention_chunk<5>, attention_chunk<6>, attention_chunk<7>, attention_chunk<8>};
#endif

extern "C" {

int attention_supported() {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

// softmax(Q^T K * scale + mask) V^T for every sequence and head, on the feature-major Q, K, V that one fused
// projection wrote (QKV[3H, B*S]: rows h*D.. of each third are head h's) into CTX[H, B*S]; mask: an additive
// (B, S) row per sequence over its keys, or null; bias: an additive (NH, S keys, S queries) table shared by
// the sequences (MPNet's relative positions), or null. No copy into a (batch, heads, tokens, dim) layout, no
// scores tensor in memory beyond one chunk per thread, and the softmax runs on the scores while they are hot.
#ifdef __AVX512F__
void attention_fm_f32(int64_t B, int64_t S, int64_t NH, int64_t D, const float* QKV, const float* mask,
                      const float* bias, float scale, float* CTX, int nthreads) {
    const int64_t H = NH * D, N = B * S;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < B * NH; ++bh) {
        float* P = thread_buffer<float, SCORES>(S * 128);  // the scores of one chunk of queries
        const int64_t b = bh / NH, h = bh % NH, off = h * D * N + b * S;
        const float* Q = QKV + off;
        const float* K = QKV + H * N + off;
        const float* V = QKV + 2 * H * N + off;
        const float* m = mask ? mask + b * S : nullptr;
        const float* bh_bias = bias ? bias + h * S * S : nullptr;
        for (int64_t i0 = 0; i0 < S; i0 += 128) {
            const int64_t w = std::min<int64_t>(128, S - i0);
            CHUNKS[(w + 15) / 16 - 1](S, D, N, Q, K, V, m, bh_bias, scale, CTX + off, i0, w, P);
        }
    }
}
#else
// Never called (attention_supported() says 0); kept so that the library exports the same symbols everywhere.
void attention_fm_f32(int64_t, int64_t, int64_t, int64_t, const float*, const float*, const float*, float, float*,
                      int) {}
#endif

}  // extern "C"

// bf16 products (AVX512-BF16): W in pair-CSR — per row, its non-zeros taken two at a time (a row with an odd
// count gets a zero partner), the two columns as int32s and the two bf16 values as one int32 — against X in
// bf16, feature-major, tokens padded to a multiple of 32. One 64-byte load holds 32 tokens of one input row;
// unpacking the two rows of a pair interleaves them as VDPBF16PS takes them, so each instruction does 32
// multiply-adds (16 tokens x the pair) into fp32, reading two bytes of activation per multiply-add where the
// fp32 kernel reads four. The unpack leaves the accumulators' tokens in a fixed order (tokens 0-3 and 8-11 ...
// in one, 4-7 and 12-15 ... in the other) that one permute per 16 outputs puts back at the end of a row.
#ifdef __AVX512BF16__
// The live lanes of 16 tokens from token n when N are real (none past the end).
static inline __mmask16 live_from(int64_t n, int64_t N) { return n >= N ? (__mmask16)0 : live16(N - n); }

// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7,
// far below bf16's rounding of the result).
static inline __m512 gelu16(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f),
                                                                         _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    __m512 erf = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));  // erf(|z|)
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u));
    erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf), sign));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.0f)));
}

// Where the products go: fp32 (Yf, masked to the N real tokens) and/or bf16 (Yb, all NP tokens, the padding
// zeroed, GELU applied first if asked), after the bias and an fp32 residual R.
struct Epilogue {
    int64_t N, NP;
    const float* bias;
    const float* R;
    float* Yf;
    uint16_t* Yb;
    int gelu;
    inline void store(int64_t m, int64_t n, __m512 v) const {
        const __mmask16 live = live_from(n, N);
        v = _mm512_add_ps(v, _mm512_set1_ps(bias ? bias[m] : 0.0f));
        if (R) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, R + m * N + n));
        if (Yf) _mm512_mask_storeu_ps(Yf + m * N + n, live, v);
        if (Yb) {
            v = _mm512_maskz_mov_ps(live, gelu ? gelu16(v) : v);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(Yb + m * NP + n), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
};

// One output row over NV * 32 tokens of the (packed) block x: the pairs [q0, q1) of the row, then the
// accumulators back in token order and through the epilogue.
template <int NV>
static inline void pair_row(const int32_t* __restrict cols, const int32_t* __restrict vals, int64_t q0, int64_t q1,
                            const uint16_t* __restrict x, int64_t ldx, const Epilogue& ep, int64_t m, int64_t n0) {
    __m512 lo[NV], hi[NV];
    for (int j = 0; j < NV; ++j) lo[j] = hi[j] = _mm512_setzero_ps();
    for (int64_t q = q0; q < q1; ++q) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(vals[q]);
        const uint16_t* x0 = x + (int64_t)cols[2 * q] * ldx;
        const uint16_t* x1 = x + (int64_t)cols[2 * q + 1] * ldx;
        for (int j = 0; j < NV; ++j) {
            __m512i a = _mm512_loadu_si512(x0 + 32 * j), b = _mm512_loadu_si512(x1 + 32 * j);
            asm("" : "+v"(a), "+v"(b));  // each row read once: GCC otherwise reloads both for the second unpack
            lo[j] = _mm512_dpbf16_ps(lo[j], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
            hi[j] = _mm512_dpbf16_ps(hi[j], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
        }
    }
    // lo holds tokens 8L + 0..3 in lanes 4L + 0..3, hi tokens 8L + 4..7 (L: the 128-bit lane)
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int j = 0; j < NV; ++j) {
        ep.store(m, n0 + 32 * j, _mm512_permutex2var_ps(lo[j], first, hi[j]));
        ep.store(m, n0 + 32 * j + 16, _mm512_permutex2var_ps(lo[j], second, hi[j]));
    }
}
// Rows r0 and r1 (16 tokens from p each, under ``live``) of bf16 data as 16 int32 pairs (r0 low, r1 high):
// the operand VDPBF16PS multiplies by a broadcast pair.
static inline __m512i pair16(const uint16_t* r0, const uint16_t* r1, __mmask16 live) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, r0));
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, r1));
    return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}

// 16 fp32 values as bf16 in the low halves of 16 int32 (round to nearest even).
static inline __m512i bf16_low(__m512 v) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)); }

// a0[v] = sum_t A[t, v] . w0[t * ws], a1 the same with w1: pair dot products of NV vectors of 16 pairs (a row
// of A per step) against a broadcast pair from each of two rows of pairs. Both attention products take it.
template <int NV>
static inline void pair_dots(const int32_t* w0, const int32_t* w1, int64_t ws, const __m512i* A, int64_t T,
                             __m512* a0, __m512* a1) {
    for (int v = 0; v < NV; ++v) a0[v] = a1[v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
        const __m512bh b0 = (__m512bh)_mm512_set1_epi32(w0[t * ws]), b1 = (__m512bh)_mm512_set1_epi32(w1[t * ws]);
        for (int v = 0; v < NV; ++v) {
            a0[v] = _mm512_dpbf16_ps(a0[v], (__m512bh)A[t * NV + v], b0);
            a1[v] = _mm512_dpbf16_ps(a1[v], (__m512bh)A[t * NV + v], b1);
        }
    }
}

// attention_chunk's bf16 twin, for one chunk of up to 16 * NV queries [i0, i0 + w) of one (sequence, head):
// Q rows of bf16 with row stride LD, D even. Kp: the head's keys as (dim pair, key) pairs; Vp: its values as
// (dim, key pair) pairs; Qp, Pp: scratch for the chunk's queries as (dim pair, query) pairs and its
// probabilities as (key pair, query) pairs; P: the fp32 scores, key-major. Both products as pair dot products.
template <int NV>
static void attention_chunk_bf16(int64_t S, int64_t D, int64_t LD, const uint16_t* Q, const int32_t* Kp,
                                 const int32_t* Vp, const float* mask, const float* bias, float scale, uint16_t* C,
                                 int64_t i0, int64_t w, __m512i* Qp, float* P, __m512i* Pp) {
    const int64_t LDP = 16 * NV, D2 = D / 2, S2 = (S + 1) / 2;
    __mmask16 live[NV];
    for (int v = 0; v < NV; ++v) live[v] = live_from(16 * v, w);
    for (int64_t dd = 0; dd < D2; ++dd)
        for (int v = 0; v < NV; ++v)
            Qp[dd * NV + v] = pair16(Q + 2 * dd * LD + i0 + 16 * v, Q + (2 * dd + 1) * LD + i0 + 16 * v, live[v]);
    for (int64_t j = 0; j < S; j += 2) {  // scores of keys j and j + 1 (a copy of j when S is odd)
        __m512 a0[NV], a1[NV];
        pair_dots<NV>(Kp + j, Kp + (j + 1 < S ? j + 1 : j), S, Qp, D2, a0, a1);
        store_scores<NV>(a0, a1, j, S, scale, mask, bias, i0, live, P);
    }
    __m512 inv[NV];
    for (int v = 0; v < NV; ++v) {  // softmax over keys, lane-wise, into key pairs; 1 / sum applied at the end
        __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; ++j) m = _mm512_max_ps(m, _mm512_load_ps(P + j * LDP + 16 * v));
        for (int64_t jj = 0; jj < S2; ++jj) {
            const __m512i e0 = bf16_low(exp16(_mm512_sub_ps(_mm512_load_ps(P + 2 * jj * LDP + 16 * v), m)));
            const __m512i e1 = 2 * jj + 1 < S
                ? bf16_low(exp16(_mm512_sub_ps(_mm512_load_ps(P + (2 * jj + 1) * LDP + 16 * v), m)))
                : _mm512_setzero_si512();
            Pp[jj * NV + v] = _mm512_or_si512(e0, _mm512_slli_epi32(e1, 16));
            // the sum of the rounded weights the context uses, so that they sum to 1 exactly
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(e0, 16)));
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(e1, 16)));
        }
        inv[v] = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
    }
    for (int64_t d = 0; d < D; d += 2) {  // context rows d and d + 1: sum_j V[d, j] P[j, :], a key pair a step
        __m512 a0[NV], a1[NV];
        pair_dots<NV>(Vp + d * S2, Vp + (d + 1) * S2, 1, Pp, S2, a0, a1);
        for (int v = 0; v < NV; ++v) {
            const __m256i c0 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a0[v], inv[v]));
            const __m256i c1 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a1[v], inv[v]));
            _mm256_mask_storeu_epi16(C + d * LD + i0 + 16 * v, live[v], c0);
            _mm256_mask_storeu_epi16(C + (d + 1) * LD + i0 + 16 * v, live[v], c1);
        }
    }
}
static void (*const CHUNKS_BF16[8])(int64_t, int64_t, int64_t, const uint16_t*, const int32_t*, const int32_t*,
                                    const float*, const float*, float, uint16_t*, int64_t, int64_t, __m512i*, float*,
                                    __m512i*) = {
    attention_chunk_bf16<1>, attention_chunk_bf16<2>, attention_chunk_bf16<3>, attention_chunk_bf16<4>,
    attention_chunk_bf16<5>, attention_chunk_bf16<6>, attention_chunk_bf16<7>, attention_chunk_bf16<8>};

static void (*const PAIR_ROWS[8])(const int32_t*, const int32_t*, int64_t, int64_t, const uint16_t*, int64_t,
                                  const Epilogue&, int64_t, int64_t) = {
    pair_row<1>, pair_row<2>, pair_row<3>, pair_row<4>, pair_row<5>, pair_row<6>, pair_row<7>, pair_row<8>};
#endif

extern "C" {

int bf16_supported() {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
// Y = W[M, K] @ Xb[K, NP] + bias[:, None] (+ R[M, N]) for pair-CSR W (indptr over pairs) and bf16 Xb whose N
// real tokens are padded to NP (a multiple of 32); into fp32 Yf[M, N] and/or bf16 Yb[M, NP] (GELU first if
// gelu). Threads split rows by pair count; token blocks of BLOCK (a multiple of 32, at most 256) outer.
void spmm_pairs_bf16(int64_t M, int64_t N, int64_t NP, int64_t K, const int32_t* indptr, const int32_t* cols,
                     const int32_t* vals, const uint16_t* Xb, const float* bias, const float* R, float* Yf,
                     uint16_t* Yb, int gelu, int64_t BLOCK, int nthreads) {
    const Epilogue ep{N, NP, bias, R, Yf, Yb, gelu};
    BLOCK = std::clamp<int64_t>(BLOCK / 32 * 32, 32, 256);  // PAIR_ROWS' widths (NP: a multiple of 32)
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        thread_rows(indptr, M, &lo, &hi);
        for (int64_t n0 = 0; n0 < NP; n0 += BLOCK) {
            const int64_t w = std::min(BLOCK, NP - n0);
            const bool packed = w < NP && hi > lo;
            const uint16_t* x = packed ? pack_block(Xb, K, NP, n0, w) : Xb + n0;
            const int64_t ldx = packed ? w : NP;
            for (int64_t m = lo; m < hi; ++m)
                PAIR_ROWS[w / 32 - 1](cols, vals, indptr[m], indptr[m + 1], x, ldx, ep, m, n0);
        }
    }
}

// attention_fm_f32's bf16 twin: QKV[3H, NP] and CTX[H, NP] bf16 with row stride NP (the padded tokens; the
// padding of CTX is left as it is), D even; mask and bias as there.
void attention_fm_bf16(int64_t B, int64_t S, int64_t NH, int64_t D, int64_t NP, const uint16_t* QKV,
                       const float* mask, const float* bias, float scale, uint16_t* CTX, int nthreads) {
    const int64_t H = NH * D, D2 = D / 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < B * NH; ++bh) {
        // one chunk's fp32 scores, its query and probability pairs, the head's key and value pairs: each 64-byte
        // aligned (sizes rounded up to 16 floats)
        const int64_t S2 = (S + 1) / 2, nP = S * 128, nQ = D2 * 8 * 16, nPp = S2 * 8 * 16;
        const int64_t nK = (D2 * S + 15) / 16 * 16, nV = (D * S2 + 15) / 16 * 16;
        float* buf = thread_buffer<float, SCORES>(nP + nQ + nPp + nK + nV);
        float* Pa = buf;
        __m512i* Qp = reinterpret_cast<__m512i*>(buf + nP);
        __m512i* Pp = reinterpret_cast<__m512i*>(buf + nP + nQ);
        int32_t* Kp = reinterpret_cast<int32_t*>(buf + nP + nQ + nPp);
        int32_t* Vp = reinterpret_cast<int32_t*>(buf + nP + nQ + nPp + nK);
        const int64_t b = bh / NH, h = bh % NH, off = h * D * NP + b * S;
        const uint16_t* Q = QKV + off;
        const uint16_t* K = QKV + H * NP + off;
        const uint16_t* V = QKV + 2 * H * NP + off;
        for (int64_t dd = 0; dd < D2; ++dd)  // keys as (dim pair, key) pairs
            for (int64_t j = 0; j < S; ++j)
                Kp[dd * S + j] = (int32_t)((uint32_t)K[2 * dd * NP + j] | ((uint32_t)K[(2 * dd + 1) * NP + j] << 16));
        for (int64_t d = 0; d < D; ++d) {  // values as (dim, key pair) pairs: each row's keys two at a time
            std::memcpy(Vp + d * S2, V + d * NP, S * sizeof(uint16_t));
            if (S % 2) Vp[d * S2 + S2 - 1] &= 0xFFFF;  // the last key of an odd S alone: its partner weighs 0
        }
        const float* m = mask ? mask + b * S : nullptr;
        const float* bh_bias = bias ? bias + h * S * S : nullptr;
        for (int64_t i0 = 0; i0 < S; i0 += 128) {
            const int64_t w = std::min<int64_t>(128, S - i0);
            CHUNKS_BF16[(w + 15) / 16 - 1](S, D, NP, Q, Kp, Vp, m, bh_bias, scale, CTX + off, i0, w, Qp, Pa, Pp);
        }
    }
}

// Xb[M, NP] = bf16(X[M, N]) (round to nearest even), the padding tokens zeroed.
void to_bf16_fm(int64_t M, int64_t N, int64_t NP, const float* X, uint16_t* Xb, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < NP; n += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(live_from(n, N), X + m * N + n);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(Xb + m * NP + n), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}
#else
// Never called (bf16_supported() says 0); kept so that the library exports the same symbols everywhere.
void spmm_pairs_bf16(int64_t, int64_t, int64_t, int64_t, const int32_t*, const int32_t*, const int32_t*,
                     const uint16_t*, const float*, const float*, float*, uint16_t*, int, int64_t, int) {}
void to_bf16_fm(int64_t, int64_t, int64_t, const float*, uint16_t*, int) {}
void attention_fm_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, const uint16_t*, const float*, const float*,
                       float, uint16_t*, int) {}
#endif

}  // extern "C"

extern "C" {

// int8 products on 1x4 blocks (AVX512-VNNI): W in block-CSR — per row, the index g of each kept block of
// 4 input features and its 4 int8 weights as one int32 — with a scale per row; X quantized per token.
int int8_supported() {
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512VNNI__
// Quantize feature-major X[K, N] once for all threads: s_x[n] = max_k |x[k, n]| / 127 and
// Xq[g][n][i] = round(x[4g + i, n] / s_x[n]) + 128 (uint8), so that one 64-byte load holds 16 tokens x 4
// features. Tokens are padded to NP (a multiple of 16) with zeros.
void quantize_b4(int64_t K, int64_t N, int64_t NP, const float* X, float* s_x, uint8_t* Xq, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < NP; n0 += 16) {
            const __mmask16 live = live16(N - n0);
            __m512 m = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; ++k)
                m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(live, X + k * N + n0)));
            _mm512_storeu_ps(s_x + n0, _mm512_max_ps(_mm512_mul_ps(m, _mm512_set1_ps(1.0f / 127)),
                                                     _mm512_set1_ps(1e-30f)));
        }
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < K / 4; ++g) {
            for (int64_t n0 = 0; n0 < NP; n0 += 16) {
                const __mmask16 live = live16(N - n0);
                const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_loadu_ps(s_x + n0));
                __m512i d = _mm512_setzero_si512();
                for (int i = 0; i < 4; ++i) {
                    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, X + (4 * g + i) * N + n0), inv);
                    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128));
                    d = _mm512_or_si512(d, _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(255)), 8 * i));
                }
                _mm512_storeu_si512(Xq + (g * NP + n0) * 4, d);
            }
        }
    }
}

// Y[M, N] = s_w[m] * s_x[n] * (sum over kept blocks of dot4(Xq, Wq) - comp[m]) + bias[m] (+ R[M, N]), where
// comp[m] = 128 * (sum of row m's int8 weights) removes the +128 that made the activations unsigned.
void spmm_b4_i8(int64_t M, int64_t N, int64_t NP, const int32_t* indptr, const int32_t* gidx, const int32_t* wq,
                const int32_t* comp, const float* s_w, const uint8_t* Xq, const float* s_x, const float* bias,
                const float* R, float* Y, int64_t BLOCK, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        thread_rows(indptr, M, &lo, &hi);
        for (int64_t n0 = 0; n0 < NP; n0 += BLOCK) {
            const int64_t nv = std::min(BLOCK, NP - n0) / 16;
            for (int64_t m = lo; m < hi; ++m) {
                __m512i acc[16];
                for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_setzero_si512();
                for (int64_t p = indptr[m]; p < indptr[m + 1]; ++p) {
                    const __m512i wb = _mm512_set1_epi32(wq[p]);
                    const uint8_t* x = Xq + ((int64_t)gidx[p] * NP + n0) * 4;
                    for (int64_t j = 0; j < nv; ++j)
                        acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(x + 64 * j), wb);
                }
                const __m512i c = _mm512_set1_epi32(comp[m]);
                const __m512 sw = _mm512_set1_ps(s_w[m]), b = _mm512_set1_ps(bias ? bias[m] : 0.0f);
                for (int64_t j = 0; j < nv; ++j) {
                    const int64_t n = n0 + 16 * j;
                    const __mmask16 live = live16(N - n);
                    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], c));
                    v = _mm512_fmadd_ps(_mm512_mul_ps(v, sw), _mm512_loadu_ps(s_x + n), b);
                    if (R) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, R + m * N + n));
                    _mm512_mask_storeu_ps(Y + m * N + n, live, v);
                }
            }
        }
    }
}
#endif

}  // extern "C"
