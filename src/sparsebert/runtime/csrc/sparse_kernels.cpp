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

extern "C" {

// A thread's copy of X's columns [n0, n0 + w) as a contiguous (K, w) block, in a buffer kept between calls.
// Without it, each non-zero reads w floats from a row N floats away from the last: at thousands of tokens
// every read lands on another page, and the walk through X's rows, not the arithmetic, sets the pace.
static const float* pack_block(const float* X, int64_t K, int64_t N, int64_t n0, int64_t w) {
    static thread_local float* buf = nullptr;
    static thread_local int64_t cap = 0;
    if (K * w > cap) {
        std::free(buf);
        cap = K * w;
        buf = static_cast<float*>(std::aligned_alloc(64, ((cap * sizeof(float) + 63) / 64) * 64));
    }
    for (int64_t k = 0; k < K; ++k) std::memcpy(buf + k * w, X + k * N + n0, w * sizeof(float));
    return buf;
}

// Y[M, N] = W[M, K] @ X[K, N] + bias[:, None] (+ R[M, N]); W in CSR (int32 indptr/indices, fp32 values).
// Rows are split between threads by non-zero count; each thread walks token blocks outer and its rows
// inner, so the block of X (packed contiguous when X is wider than one block) stays in cache while the
// thread's rows reuse it.
void spmm_csr_f32(int64_t M, int64_t N, int64_t K, const int32_t* indptr, const int32_t* indices,
                  const float* values, const float* X, const float* bias, const float* R, float* Y, int64_t BLOCK,
                  int nthreads) {
    const int64_t nnz = indptr[M];
#ifndef __AVX512F__
    BLOCK = std::min<int64_t>(BLOCK, 128);  // 16 accumulators of 16 floats would spill on 16 AVX2 registers
#endif
    #pragma omp parallel num_threads(nthreads)
    {
        const int T = omp_get_num_threads();
        const int t = omp_get_thread_num();
        const int64_t lo = std::lower_bound(indptr, indptr + M, (int32_t)((nnz * t) / T)) - indptr;
        const int64_t hi = t == T - 1 ? M
                         : std::lower_bound(indptr, indptr + M, (int32_t)((nnz * (t + 1)) / T)) - indptr;
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

// LayerNorm over the feature axis of a feature-major X[H, N] (each column is one token).
void layer_norm_fm_f32(int64_t H, int64_t N, const float* X, const float* gamma, const float* beta, float eps,
                       float* Y, int nthreads) {
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
        const __m512 s = _mm512_set1_ps(scale);
        const __m512 m0 = _mm512_set1_ps(mask ? mask[j] : 0.0f), m1 = _mm512_set1_ps(mask ? mask[j1] : 0.0f);
        for (int v = 0; v < NV; ++v) {
            __m512 b0 = m0, b1 = m1;
            if (bias) {
                b0 = _mm512_add_ps(b0, _mm512_maskz_loadu_ps(live[v], bias + j * S + i0 + 16 * v));
                b1 = _mm512_add_ps(b1, _mm512_maskz_loadu_ps(live[v], bias + j1 * S + i0 + 16 * v));
            }
            _mm512_store_ps(P + j * LD + 16 * v, _mm512_fmadd_ps(a0[v], s, b0));
            if (j + 1 < S) _mm512_store_ps(P + (j + 1) * LD + 16 * v, _mm512_fmadd_ps(a1[v], s, b1));
        }
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
        static thread_local float* P = nullptr;  // per thread: the scores of one chunk of queries
        static thread_local int64_t cap = 0;
        if (S * 128 > cap) {
            std::free(P);
            cap = S * 128;
            P = static_cast<float*>(std::aligned_alloc(64, cap * sizeof(float)));
        }
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
    const int64_t nnz = indptr[M];
    #pragma omp parallel num_threads(nthreads)
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = std::lower_bound(indptr, indptr + M, (int32_t)((nnz * t) / T)) - indptr;
        const int64_t hi = t == T - 1 ? M
                         : std::lower_bound(indptr, indptr + M, (int32_t)((nnz * (t + 1)) / T)) - indptr;
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
