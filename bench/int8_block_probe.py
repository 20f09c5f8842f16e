"""Probe for item 2 of the runtime issue: how fast is an int8 sparse kernel on 1x4 blocks, on this CPU?

A first, unoptimised kernel (AVX512-VNNI ``vpdpbusd``: one 64-byte load of 16 tokens x 4 input features
feeds 64 multiply-adds) on random 1x4-blocked matrices of BERT-base shapes, beside the package's fp32
CSR kernel on the same matrices and PyTorch's dense dynamic int8 linear (fbgemm). Weights: int8 per
row; activations: int8 per token, quantized inside the kernel (scalar, per thread — the slow part).
The kernel is timed whole, then with all-zero weights (the quantize-and-pack pass alone), so the
products' share shows what a kernel with a fast, shared quantization pass could reach. Not used by
the engine. Needs g++ and a CPU with AVX512-VNNI.

    .venv/bin/python bench/int8_block_probe.py
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sparsebert.runtime.kernels import CSRMatrix, cpu_info, spmm

SOURCE = r"""
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <immintrin.h>
#include <omp.h>

extern "C" {
// Y[M,N] = s_w[m] * s_x[n] * (sum_blocks dot4(Xq[4g..4g+3, n], Wq[block]) ) + bias[m]
// Weights: 1x4 blocks along K, int8, per-row scale. Activations: per-token scale, quantized in the pack.
void spmm_b4_i8(int64_t M, int64_t N, int64_t K, const int32_t* indptr, const int32_t* gidx, const int32_t* wq,
                const int32_t* comp, const float* s_w, const float* X, const float* inv_s_x, const float* s_x,
                const float* bias, float* Y, int64_t BLOCK, int nthreads) {
    const int64_t nnz = indptr[M];
    const int64_t G = K / 4;
    #pragma omp parallel num_threads(nthreads)
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = std::lower_bound(indptr, indptr + M, (int32_t)((nnz * t) / T)) - indptr;
        const int64_t hi = t == T - 1 ? M
                         : std::lower_bound(indptr, indptr + M, (int32_t)((nnz * (t + 1)) / T)) - indptr;
        uint8_t* buf = (uint8_t*)std::aligned_alloc(64, G * BLOCK * 4 + 64);
        for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
            const int64_t w = std::min(BLOCK, N - n0);
            const int64_t wp = (w + 15) / 16 * 16;
            for (int64_t g = 0; g < G; ++g) {
                uint8_t* dst = buf + g * wp * 4;
                for (int i = 0; i < 4; ++i) {
                    const float* src = X + (4 * g + i) * N + n0;
                    for (int64_t j = 0; j < w; ++j) {
                        int q = (int)std::nearbyint(src[j] * inv_s_x[n0 + j]);
                        dst[j * 4 + i] = (uint8_t)(q + 128);
                    }
                    for (int64_t j = w; j < wp; ++j) dst[j * 4 + i] = 128;
                }
            }
            const int64_t nv = wp / 16;
            for (int64_t m = lo; m < hi; ++m) {
                __m512i acc[16];
                for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_setzero_si512();
                for (int64_t p = indptr[m]; p < indptr[m + 1]; ++p) {
                    const __m512i wb = _mm512_set1_epi32(wq[p]);
                    const uint8_t* base = buf + (int64_t)gidx[p] * wp * 4;
                    for (int64_t j = 0; j < nv; ++j)
                        acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(base + 64 * j), wb);
                }
                const __m512i c = _mm512_set1_epi32(comp[m]);
                const __m512 sw = _mm512_set1_ps(s_w[m]);
                const __m512 b = _mm512_set1_ps(bias ? bias[m] : 0.f);
                float* y = Y + m * N + n0;
                for (int64_t j = 0; j < nv; ++j) {
                    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], c));
                    v = _mm512_fmadd_ps(_mm512_mul_ps(v, sw), _mm512_loadu_ps(s_x + n0 + 16 * j), b);
                    const int64_t left = w - 16 * j;
                    if (left >= 16) _mm512_storeu_ps(y + 16 * j, v);
                    else _mm512_mask_storeu_ps(y + 16 * j, (__mmask16)((1u << left) - 1), v);
                }
            }
        }
        std::free(buf);
    }
}

// Quantize a feature-major X[K, N] (N a multiple of 16) once for all threads: a scale per token
// (s_x[n] = max_k |x[k, n]| / 127) and Xq in the layout below, 16 tokens x 4 features per 64-byte vector.
void quantize_b4(int64_t K, int64_t N, const float* X, float* s_x, uint8_t* Xq, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 16) {
            __m512 m = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; ++k) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(X + k * N + n0)));
            _mm512_storeu_ps(s_x + n0, _mm512_max_ps(_mm512_mul_ps(m, _mm512_set1_ps(1.0f / 127)),
                                                     _mm512_set1_ps(1e-12f)));
        }
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < K / 4; ++g) {
            for (int64_t n0 = 0; n0 < N; n0 += 16) {
                const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_loadu_ps(s_x + n0));
                __m512i d = _mm512_setzero_si512();
                for (int i = 0; i < 4; ++i) {
                    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(X + (4 * g + i) * N + n0), inv);
                    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128));
                    d = _mm512_or_si512(d, _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(255)), 8 * i));
                }
                _mm512_storeu_si512(Xq + (g * N + n0) * 4, d);
            }
        }
    }
}

// The same products on activations quantized beforehand, once for all threads: Xq[g][n][i] = x[4g+i][n] as
// uint8 (q + 128), g = K / 4 groups of 4 input features, each group's N tokens contiguous.
void spmm_b4_i8_prepacked(int64_t M, int64_t N, const int32_t* indptr, const int32_t* gidx, const int32_t* wq,
                          const int32_t* comp, const float* s_w, const uint8_t* Xq, const float* s_x,
                          const float* bias, float* Y, int64_t BLOCK, int nthreads) {
    const int64_t nnz = indptr[M];
    #pragma omp parallel num_threads(nthreads)
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = std::lower_bound(indptr, indptr + M, (int32_t)((nnz * t) / T)) - indptr;
        const int64_t hi = t == T - 1 ? M
                         : std::lower_bound(indptr, indptr + M, (int32_t)((nnz * (t + 1)) / T)) - indptr;
        for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
            const int64_t w = std::min(BLOCK, N - n0), nv = w / 16;  // N: a multiple of 16 here
            for (int64_t m = lo; m < hi; ++m) {
                __m512i acc[16];
                for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_setzero_si512();
                for (int64_t p = indptr[m]; p < indptr[m + 1]; ++p) {
                    const __m512i wb = _mm512_set1_epi32(wq[p]);
                    const uint8_t* base = Xq + ((int64_t)gidx[p] * N + n0) * 4;
                    for (int64_t j = 0; j < nv; ++j)
                        acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(base + 64 * j), wb);
                }
                const __m512i c = _mm512_set1_epi32(comp[m]);
                const __m512 sw = _mm512_set1_ps(s_w[m]);
                const __m512 b = _mm512_set1_ps(bias ? bias[m] : 0.f);
                float* y = Y + m * N + n0;
                for (int64_t j = 0; j < nv; ++j) {
                    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], c));
                    v = _mm512_fmadd_ps(_mm512_mul_ps(v, sw), _mm512_loadu_ps(s_x + n0 + 16 * j), b);
                    _mm512_storeu_ps(y + 16 * j, v);
                }
            }
        }
    }
}
}
"""


def build() -> ctypes.CDLL:
    folder = Path(tempfile.mkdtemp())
    (folder / "k.cpp").write_text(SOURCE)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    subprocess.run(["g++", *flags, str(folder / "k.cpp"), "-o", str(folder / "k.so")], check=True)
    lib = ctypes.CDLL(str(folder / "k.so"))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.spmm_b4_i8.argtypes = [i64, i64, i64] + [ptr] * 10 + [i64, ctypes.c_int]
    lib.spmm_b4_i8_prepacked.argtypes = [i64, i64] + [ptr] * 9 + [i64, ctypes.c_int]
    lib.quantize_b4.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int]
    return lib


def blocked(m: int, k: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A random (m, k) matrix keeping ``density`` of its 1x4 blocks along the input dimension."""
    keep = torch.rand(m, k // 4, generator=gen) < density
    return torch.randn(m, k, generator=gen) * keep.repeat_interleave(4, dim=1)


class BlockInt8:
    """Block-CSR of 1x4 int8 blocks with a scale per row, and the compensation for unsigned activations."""

    def __init__(self, lib: ctypes.CDLL, w: torch.Tensor, bias: torch.Tensor) -> None:
        m, k = w.shape
        self.lib, self.shape, self.bias = lib, (m, k), bias.contiguous()
        self.s_w = (w.abs().amax(1) / 127).clamp_min(1e-12).contiguous()
        q = torch.round(w / self.s_w[:, None]).to(torch.int8).view(m, k // 4, 4)
        nonzero = w.view(m, k // 4, 4).abs().sum(-1) != 0
        self.indptr = torch.zeros(m + 1, dtype=torch.int32)
        self.indptr[1:] = nonzero.sum(1).cumsum(0)
        rows, cols = nonzero.nonzero(as_tuple=True)
        self.gidx = cols.to(torch.int32).contiguous()
        self.wq = q[rows, cols].contiguous().view(torch.int32).view(-1).contiguous()
        self.comp = (128 * q.to(torch.int32).sum((1, 2))).to(torch.int32).contiguous()

    def __call__(self, x: torch.Tensor, block: int = 128) -> torch.Tensor:
        (m, k), n = self.shape, x.shape[1]
        s_x, inv = torch.zeros(n + 16), torch.zeros(n + 16)  # padded: the kernel reads whole vectors
        s_x[:n] = (x.abs().amax(0) / 127).clamp_min(1e-12)
        inv[:n] = 1 / s_x[:n]
        y = torch.empty(m, n)
        ptrs = (self.indptr, self.gidx, self.wq, self.comp, self.s_w, x, inv, s_x, self.bias, y)
        self.lib.spmm_b4_i8(m, n, k, *(t.data_ptr() for t in ptrs), block, torch.get_num_threads())
        return y

    def prepacked(self, x: torch.Tensor, block: int = 128, fast: bool = True) -> torch.Tensor:
        """Quantize X once for all threads — with the kernel's vectorised pass (``fast``) or with torch
        ops — then the products: what an engine that quantizes each activation once would pay."""
        (m, k), n = self.shape, x.shape[1]
        if fast:
            s_x, xq = torch.empty(n), torch.empty(k * n, dtype=torch.uint8)
            self.lib.quantize_b4(k, n, x.data_ptr(), s_x.data_ptr(), xq.data_ptr(), torch.get_num_threads())
        else:
            s_x = (x.abs().amax(0) / 127).clamp_min(1e-12)
            xq = torch.round(x / s_x).add_(128).to(torch.uint8).view(k // 4, 4, n).transpose(1, 2).contiguous()
        y = torch.empty(m, n)
        ptrs = (self.indptr, self.gidx, self.wq, self.comp, self.s_w, xq, s_x, self.bias, y)
        self.lib.spmm_b4_i8_prepacked(m, n, *(t.data_ptr() for t in ptrs), block, torch.get_num_threads())
        return y


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    if "avx512_vnni" not in cpu_info().get("flags", ""):
        sys.exit("this probe needs AVX512-VNNI")
    torch.set_num_threads(2)
    lib, gen = build(), torch.Generator().manual_seed(0)
    print(f"{cpu_info().get('model name')}, 2 threads; times in ms; 95% of the 1x4 blocks pruned")
    print("shape, tokens: fp32 CSR | int8 1x4 whole (quantize+pack alone, products) | int8 1x4 quantized once "
          "with torch ops | vectorised | dense int8 | relative error (per-thread / vectorised)")  # fmt: skip
    for m, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
        w, bias = blocked(m, k, 0.05, gen), torch.randn(m, generator=gen)
        op, csr, empty = BlockInt8(lib, w, bias), CSRMatrix.from_dense(w), BlockInt8(lib, torch.zeros(m, k), bias)
        linear = nn.Linear(k, m)
        linear.weight.data, linear.bias.data = w.clone(), bias.clone()
        dense_int8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
        for n in (128, 4096):
            x, out = torch.randn(k, n, generator=gen), torch.empty(m, n)
            exact = w @ x + bias[:, None]
            error = float((op(x) - exact).abs().max() / exact.abs().max())
            error_pre = float((op.prepacked(x) - exact).abs().max() / exact.abs().max())
            fns = (partial(spmm, csr, x, bias, out=out), partial(op, x), partial(empty, x),
                   partial(op.prepacked, x, fast=False), partial(op.prepacked, x))  # fmt: skip
            fp32, int8, pack, pre_torch, pre = (median_ms(fn) for fn in fns)
            dense = median_ms(partial(dense_int8, x.t().contiguous()))
            products = max(int8 - pack, 0)
            print(f"{m}x{k}, {n}: {fp32:.2f} | {int8:.2f} ({pack:.2f}, {products:.2f}) | {pre_torch:.2f} | "
                  f"{pre:.2f} | {dense:.2f} | "
                  f"{error:.1e} / {error_pre:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
