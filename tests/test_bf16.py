"""The bf16 engine (``backend="bf16"``, runtime/bf16.py): its products and attention against fp64 references
on the same bf16-rounded operands, on every tail (one token, odd sizes, padding), and the whole encoder
against the exact engine. Skipped, not failed, where the CPU lacks AVX512-BF16."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, MPNetConfig

from sparsebert.errors import SparseBertError
from sparsebert.pruning import Pruner
from sparsebert.runtime import CSRMatrix, SparseEncoder, engine, ops, sparsify
from sparsebert.runtime.bf16 import (
    PairCSR,
    attention_bf16,
    bf16_available,
    padded,
    spmm_bf16,
    to_bf16,
    torch_attention_bf16,
)
from sparsebert.runtime.kernels import attention_available, attention_fm, layer_norm_fm
from sparsebert.runtime.ops import make_projection

needs_bf16 = pytest.mark.skipif(not bf16_available(), reason="the bf16 kernels need AVX512-BF16")


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def sparse_matrix(m: int, k: int, density: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < density)
    w[m // 2] = 0  # an empty row
    return w


def test_pair_csr_holds_every_weight_once_with_zero_partners():
    """Odd rows get a zero partner, empty rows no pair; the pairs rebuild the bf16-rounded matrix."""
    gen = torch.Generator().manual_seed(0)
    w = sparse_matrix(9, 13, 0.3, gen)
    pc = PairCSR.from_csr(CSRMatrix.from_dense(w))
    values = pc.values.view(torch.bfloat16).float().view(-1, 2)
    rebuilt = torch.zeros(9, 13)
    for row in range(9):
        for q in range(int(pc.indptr[row]), int(pc.indptr[row + 1])):
            for side in (0, 1):
                rebuilt[row, int(pc.cols[2 * q + side])] += values[q, side]
    torch.testing.assert_close(rebuilt, w.bfloat16().float(), rtol=0, atol=0)
    counts = (w != 0).sum(dim=1)
    assert torch.equal(pc.indptr.diff(), (counts + 1) // 2)


@needs_bf16
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 1, 1), (5, 3, 1), (17, 33, 31), (33, 64, 33), (64, 40, 300), (8, 2048, 70)]
)
def test_spmm_bf16_matches_a_float64_product_on_every_tail(m, k, n):
    """fp32 and bf16 outputs in one pass, bias and residual added, the bf16 padding zeroed; the GELU output
    equals the exact GELU of the fp32 one, rounded to bf16."""
    gen = torch.Generator().manual_seed(m * 1000 + n)
    w, x = sparse_matrix(m, k, 0.2, gen), torch.randn(k, n, generator=gen)
    bias, residual = torch.randn(m, generator=gen), torch.randn(m, n, generator=gen)
    pc, xb = PairCSR.from_csr(CSRMatrix.from_dense(w)), to_bf16(x)
    assert xb.shape == (k, padded(n)) and padded(n) % 32 == 0 and not xb[:, n:].any()
    out, out_b = torch.empty(m, n), torch.full((m, padded(n)), 7.0, dtype=torch.bfloat16)
    spmm_bf16(pc, xb, n, bias, residual, out=out, out_bf16=out_b)
    want = bf16_round(w) @ bf16_round(x) + bias.double()[:, None] + residual.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_b[:, :n], out.bfloat16()) and not out_b[:, n:].any()
    gelu = torch.full_like(out_b, 7.0)
    spmm_bf16(pc, xb, n, bias, residual, out_bf16=gelu, gelu=True)
    torch.testing.assert_close(gelu[:, :n].float(), torch.nn.functional.gelu(out), rtol=8e-3, atol=1e-5)
    assert not gelu[:, n:].any()


@needs_bf16
def test_spmm_bf16_rejects_what_it_cannot_take():
    pc = PairCSR.from_csr(CSRMatrix.from_dense(torch.eye(4)))
    with pytest.raises(SparseBertError, match="bf16"):
        spmm_bf16(pc, torch.zeros(4, 32), 32, out=torch.empty(4, 32))  # fp32 X
    xb = torch.zeros(4, 32, dtype=torch.bfloat16)
    with pytest.raises(SparseBertError, match="out"):
        spmm_bf16(pc, xb, 32)
    with pytest.raises(SparseBertError, match="gelu"):  # GELU exists on the bf16 output only
        spmm_bf16(pc, xb, 32, out=torch.empty(4, 32), gelu=True)
    with pytest.raises(SparseBertError, match="contiguous"):  # a view the kernel would write out of place
        spmm_bf16(pc, xb, 32, out_bf16=torch.zeros(32, 4, dtype=torch.bfloat16).t())
    with pytest.raises(SparseBertError, match="bias"):
        spmm_bf16(pc, xb, 32, torch.zeros(3), out=torch.empty(4, 32))


@needs_bf16
@pytest.mark.skipif(not attention_available(), reason="the fused attention kernel needs AVX-512")
@pytest.mark.parametrize(
    ("batch", "seq", "heads", "dim", "bias"),
    [(1, 1, 1, 2, False), (1, 5, 2, 4, True), (3, 37, 2, 8, True), (2, 130, 3, 16, False)],
)
def test_bf16_attention_matches_the_fp32_kernel_on_the_same_inputs(batch, seq, heads, dim, bias):
    """Odd sequence lengths (a key without a partner), more than one chunk of 128 queries, padding masked
    and MPNet's bias; the bf16 context is within bf16's rounding of the fp32 kernel's."""
    gen = torch.Generator().manual_seed(seq)
    hidden, tokens = heads * dim, batch * seq
    qkv = torch.randn(3 * hidden, tokens, generator=gen).bfloat16().float()
    mask = torch.zeros(batch, seq)
    mask[-1, seq // 2 + 1 :] = torch.finfo(torch.float32).min
    table = torch.randn(heads, seq, seq, generator=gen) if bias else None
    want = torch.empty(hidden, tokens)
    attention_fm(qkv, batch, heads, mask, 1 / math.sqrt(dim), want, table)
    got = torch.full((hidden, padded(tokens)), 3.0, dtype=torch.bfloat16)
    attention_bf16(to_bf16(qkv), batch, seq, heads, mask, 1 / math.sqrt(dim), got, table)
    torch.testing.assert_close(got[:, :tokens].float(), want, rtol=1e-2, atol=1e-2)


def pruned(config, sparsity: float = 0.9):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    Pruner.one_shot(model, sparsity)
    return model


@needs_bf16
@pytest.mark.parametrize("config_cls", [BertConfig, MPNetConfig])
def test_the_bf16_engine_stays_close_to_the_exact_engine(config_cls):
    """BERT and MPNet (its relative-position bias), padding, batch 1 and several: every product on bf16
    activations, the FFN's GELU fused; the hidden states within bf16's error of the exact engine's."""
    config = config_cls(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)  # fmt: skip
    exact = pruned(config)
    fast = copy.deepcopy(exact)
    report = sparsify(fast, backend="bf16")
    assert report.mode == "encoder" and set(report.kernels) == {"cpp-bf16|dense-bf16"}  # timed at the first call
    sparsify(exact)
    ids = torch.randint(5, 80, (3, 45), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    base = config_cls.model_type
    with torch.no_grad():
        for batch, m in ((ids[:1, :7], None), (ids, mask)):
            got = getattr(fast, base)(input_ids=batch, attention_mask=m).last_hidden_state
            want = getattr(exact, base)(input_ids=batch, attention_mask=m).last_hidden_state
            assert isinstance(getattr(fast, base).encoder, SparseEncoder)
            torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)
    assert (3 * 45).bit_length() in getattr(fast, base).encoder.attention_plan  # the padded batch's: bf16 too


@needs_bf16
def test_fastest_times_the_bf16_kernel_and_bf16_inputs_need_the_bf16_backend():
    w = sparse_matrix(64, 64, 0.1, torch.Generator().manual_seed(3))
    assert "cpp-bf16" in make_projection(w, None, backend="fastest").candidates
    op = make_projection(w, None, backend="auto")
    with pytest.raises(SparseBertError, match="bf16 backend"):
        op.bf16(torch.zeros(64, 32, dtype=torch.bfloat16), 32, out=torch.empty(64, 32))


def test_the_bf16_backend_is_refused_in_one_line_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(ops, "bf16_available", lambda: False)
    with pytest.raises(SparseBertError, match="AVX512-BF16"):
        ops.resolve_backend("bf16")


@pytest.mark.parametrize("tokens", [37, 130])
def test_layer_norm_writes_the_bf16_copy_the_next_product_reads(tokens):
    """Rounded to nearest even as torch rounds, the padding tokens zeroed (one block of 64 tokens, and several),
    the fp32 result unchanged."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, tokens, generator=gen) * 3
    weight, bias = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    want = layer_norm_fm(x, weight, bias, 1e-12)
    out_b = torch.full((24, padded(tokens)), 5.0, dtype=torch.bfloat16)
    got = layer_norm_fm(x.clone(), weight, bias, 1e-12, out_bf16=out_b)
    assert torch.equal(got, want) and torch.equal(out_b[:, :tokens], want.bfloat16()) and not out_b[:, tokens:].any()


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_torch_bf16_attention_matches_the_fused_kernel(bias):
    """The path for AMX (torch's bf16 GEMMs on views): the same context as the fused kernel, padding and
    MPNet's bias included, within bf16's rounding."""
    gen = torch.Generator().manual_seed(9)
    batch, seq, heads, dim = 3, 21, 2, 8
    hidden, tokens = heads * dim, batch * seq
    qkv = to_bf16(torch.randn(3 * hidden, tokens, generator=gen))
    mask = torch.zeros(batch, seq)
    mask[1, 15:] = torch.finfo(torch.float32).min
    table = torch.randn(heads, seq, seq, generator=gen) if bias else None
    fused, other = (torch.zeros(hidden, padded(tokens), dtype=torch.bfloat16) for _ in range(2))
    attention_bf16(qkv, batch, seq, heads, mask, 0.35, fused, table)
    torch_attention_bf16(qkv, batch, seq, heads, mask, 0.35, other, table)
    torch.testing.assert_close(other.float(), fused.float(), rtol=1e-2, atol=1e-2)


@needs_bf16
@pytest.mark.parametrize("faster", ["fused", "torch"])
def test_the_bf16_engine_times_its_two_attentions_once_per_size(monkeypatch, faster):
    """The fused kernel against torch's bf16 GEMMs (AMX where present), on a scripted clock: the faster is kept
    for that power of two of tokens and the other never runs again at that size."""
    calls: list[str] = []

    def clock(fn, *args) -> float:
        fn(*args)
        return 1.0 if (fn.__name__ == "attention_bf16") == (faster == "fused") else 2.0

    monkeypatch.setattr(ops, "time_kernel", clock)
    fast = pruned(BertConfig(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128))  # fmt: skip
    sparsify(fast, backend="bf16")
    for name in ("attention_bf16", "torch_attention_bf16"):
        real = getattr(engine, name)
        counted = functools.wraps(real)(lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
        monkeypatch.setattr(engine, name, counted)
    ids = torch.randint(5, 80, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast(input_ids=ids)
        assert fast.bert.encoder.attention_plan == {(2 * 9).bit_length(): faster}
        calls.clear()
        fast(input_ids=ids)
    want = "attention_bf16" if faster == "fused" else "torch_attention_bf16"
    assert calls == [want, want]  # one call a layer


@needs_bf16
def test_a_bf16_projection_from_fp32_activations_as_fastest_and_linear_mode_run_it():
    """The bf16 CSR kernel behind ``fastest`` and the linear mode: fp32 in, fp32 out, bias and residual added."""
    gen = torch.Generator().manual_seed(6)
    w, x = sparse_matrix(40, 24, 0.2, gen), torch.randn(24, 19, generator=gen)
    bias, residual = torch.randn(40, generator=gen), torch.randn(40, 19, generator=gen)
    kernel = ops.build_kernel("cpp-bf16", CSRMatrix.from_dense(w), lambda: w)
    want = bf16_round(w) @ bf16_round(x) + bias.double()[:, None] + residual.double()
    torch.testing.assert_close(kernel(x, bias, residual, None).double(), want, rtol=1e-5, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize(
    ("hidden", "heads", "act", "max_density", "kinds"),
    [(64, 4, "gelu_new", None, {"cpp-bf16|dense-bf16"}),  # another activation: in fp32 between the FFN's products
     (36, 4, "gelu", None, {"cpp-bf16|dense-bf16"}),  # heads of 9: attention in fp32 between two conversions
     (64, 4, "gelu", 0.05, {"dense-bf16"})],  # matrices too dense to store sparsely: bf16 GEMMs
)  # fmt: skip
def test_the_bf16_engines_other_paths_stay_close_too(hidden, heads, act, max_density, kinds):
    config = BertConfig(vocab_size=80, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=2 * hidden, hidden_act=act)  # fmt: skip
    exact = pruned(config)
    fast = copy.deepcopy(exact)
    assert set(sparsify(fast, backend="bf16", max_density=max_density).kernels) == kinds
    sparsify(exact)
    ids = torch.randint(5, 80, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        got = fast.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        want = exact.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)


@needs_bf16
@pytest.mark.parametrize("faster", ["cpp-bf16", "dense-bf16"])
def test_the_bf16_backend_times_bf16_csr_against_dense_bf16_per_matrix(monkeypatch, faster):
    """On AMX's matrix units a dense bf16 GEMM can beat bf16 CSR (90% sparse, batch 32): the bf16 backend
    times both on each matrix's bf16 inputs at the first call of a size, keeps the faster, drops the other
    and runs only it afterwards; a scripted clock decides, so the test does not depend on this CPU."""
    config = BertConfig(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)  # fmt: skip
    exact = pruned(config)
    fast = copy.deepcopy(exact)
    sparsify(exact)
    ids = torch.randint(5, 80, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = exact.bert(input_ids=ids).last_hidden_state
    build, calls = ops.build_kernel, []

    def rigged(kind, master, dense):
        kernel = build(kind, master, dense)
        real = kernel.bf16
        kernel.bf16 = functools.wraps(real)(lambda *a: (calls.append(kind), real(*a))[1])
        kernel.bf16.kind = kind
        return kernel

    def clock(fn, *args) -> float:
        fn(*args)
        return 1.0 if getattr(fn, "kind", None) == faster else 3.0

    monkeypatch.setattr(ops, "build_kernel", rigged)
    monkeypatch.setattr(ops, "time_kernel", clock)
    report = sparsify(fast, backend="bf16")
    with torch.no_grad():
        fast(input_ids=ids)
        assert {op.kind_for(26) for op in report.ops} == {faster} and set(report.kernels) == {faster}
        assert all(op.held_kinds == {faster} for op in report.ops)
        calls.clear()
        got = fast.bert(input_ids=ids).last_hidden_state
    assert calls == [faster] * len(report.ops)
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)
