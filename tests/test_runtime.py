"""Sparse runtime: kernel correctness on random shapes, the fallback, model equivalence, and `bench`."""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig

from sparsebert.errors import SparseBertError
from sparsebert.pruning import Pruner
from sparsebert.runtime import CSRMatrix, SparseEncoder, SparseLinear, engine, kernels, layer_norm_fm, sparsify, spmm
from sparsebert.runtime.commands import register_commands
from sparsebert.runtime.int8 import BlockInt8Matrix, int8_available, spmm_int8
from sparsebert.runtime.kernels import attention_available, attention_fm, cpp_available, token_block
from sparsebert.runtime.ops import make_projection

BACKENDS = ["cpp", "torch"] if cpp_available() else ["torch"]


def random_sparse(m: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=gen)
    w[torch.rand(m, k, generator=gen) < sparsity] = 0
    return w


def test_the_compiled_kernels_build():
    # g++ is part of the development setup; without it every cpp test below would silently skip.
    assert cpp_available()


@pytest.mark.parametrize("seed", range(6))
def test_spmm_matches_dense_on_random_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    m, k, n = (int(torch.randint(1, 300, (1,), generator=gen)) for _ in range(3))
    sparsity = [0.0, 0.5, 0.9, 0.95, 0.99, 1.0][seed]
    w = random_sparse(m, k, sparsity, gen)
    x, b, r = torch.randn(k, n, generator=gen), torch.randn(m, generator=gen), torch.randn(m, n, generator=gen)
    csr = CSRMatrix.from_dense(w)
    assert csr.nnz == int((w != 0).sum())
    torch.testing.assert_close(spmm(csr, x, b, r), w @ x + b[:, None] + r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(spmm(csr, x), w @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 127, 128, 129, 255, 256, 300, 529])
def test_spmm_token_counts_cross_every_vector_block(n):
    gen = torch.Generator().manual_seed(n)
    w = random_sparse(40, 33, 0.8, gen)
    w[3] = 0  # an empty row
    w[:, 5] = 0  # an unused input feature
    x = torch.randn(33, n, generator=gen)
    torch.testing.assert_close(spmm(CSRMatrix.from_dense(w), x), w @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [384, 768, 3072])
def test_spmm_packs_wide_inputs_block_by_block(k):
    """Wider than one token block (token_block(k): 256, 128 and 64 tokens), X is copied block by block into
    a per-thread buffer that grows with K; the tail block, ``out`` and the residual must still land right."""
    gen = torch.Generator().manual_seed(k)
    n = 2 * token_block(k) + 37
    w = random_sparse(48, k, 0.95, gen)
    x, b, r = torch.randn(k, n, generator=gen), torch.randn(48, generator=gen), torch.randn(48, n, generator=gen)
    out = torch.full((48, n), float("nan"))
    y = spmm(CSRMatrix.from_dense(w), x, b, r, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, w @ x + b[:, None] + r, rtol=1e-4, atol=1e-4)


def test_spmm_without_a_compiler_gives_the_same_product(monkeypatch):
    """Where the kernels cannot be built, spmm falls back on torch's CSR, bias, residual and ``out`` included."""
    monkeypatch.setattr(kernels, "library", lambda: None)
    gen = torch.Generator().manual_seed(7)
    w = random_sparse(30, 20, 0.9, gen)
    x, b, r = torch.randn(20, 9, generator=gen), torch.randn(30, generator=gen), torch.randn(30, 9, generator=gen)
    out = torch.full((30, 9), float("nan"))
    assert spmm(CSRMatrix.from_dense(w), x, b, r, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, w @ x + b[:, None] + r, rtol=1e-4, atol=1e-4)


def test_fully_pruned_matrix_gives_the_bias():
    w = torch.zeros(7, 5)
    b = torch.arange(7.0)
    out = spmm(CSRMatrix.from_dense(w), torch.randn(5, 20), b)
    assert torch.equal(out, b[:, None].expand(7, 20))


def test_spmm_rejects_bad_inputs():
    csr = CSRMatrix.from_dense(torch.eye(4))
    with pytest.raises(SparseBertError, match="shape"):
        spmm(csr, torch.randn(5, 3))
    if cpp_available():
        with pytest.raises(SparseBertError, match="fp32"):
            spmm(csr, torch.randn(4, 3, dtype=torch.float64))


def test_layer_norm_over_features():
    x = torch.randn(48, 70) * 3 + 1
    g, b = torch.randn(48), torch.randn(48)
    ref = torch.nn.functional.layer_norm(x.t(), (48,), g, b, 1e-12).t()
    torch.testing.assert_close(layer_norm_fm(x, g, b, 1e-12), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_falls_back_to_dense_when_not_sparse_enough(backend):
    gen = torch.Generator().manual_seed(0)
    dense_w, sparse_w = random_sparse(32, 16, 0.5, gen), random_sparse(32, 16, 0.95, gen)
    b = torch.randn(32, generator=gen)
    x = torch.randn(16, 9, generator=gen)
    dense_op = make_projection(dense_w, b, max_density=0.3, backend=backend)
    sparse_op = make_projection(sparse_w, b, max_density=0.3, backend=backend)
    assert dense_op.kind == "dense"
    assert sparse_op.kind == ("cpp-csr" if backend == "cpp" else "torch-csr")
    torch.testing.assert_close(dense_op(x), dense_w @ x + b[:, None], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse_op(x), sparse_w @ x + b[:, None], rtol=1e-4, atol=1e-4)


def _rig_timing(monkeypatch, calls: list[str], seconds: dict[str, list[float]], others: float = 0.02) -> None:
    """A scripted clock for the kernel choice: the n-th call of kernel ``kind`` measures ``seconds[kind][n-1]``
    (its last value repeating; ``others`` for kinds not named), so no test depends on the machine's speed
    or load; every kernel call is recorded in ``calls``. The kernels still compute for real."""
    from sparsebert.runtime import ops

    build = ops.build_kernel

    def rigged_build(kind, master, dense):
        kernel = build(kind, master, dense)

        def run(*args):
            calls.append(kind)
            return kernel(*args)

        run.kind = kind
        return run

    def scripted_seconds(kernel, *args):
        kernel(*args)
        script = seconds.get(kernel.kind, [others])
        return script[min(calls.count(kernel.kind), len(script)) - 1]

    monkeypatch.setattr(ops, "build_kernel", rigged_build)
    monkeypatch.setattr(ops, "time_kernel", scripted_seconds)


@pytest.mark.parametrize("fast", ["dense", "csr"])
def test_auto_backend_times_each_matrix_and_keeps_the_faster_exact_kernel(monkeypatch, fast):
    """backend="auto": a sparse matrix has two exact candidates; the first call at each input size times
    both and keeps the faster for that size (later calls at that size do not time again), the loser is
    dropped (a compressed model stays small), a new size is timed anew, and every result is exact."""
    csr = "cpp-csr" if cpp_available() else "torch-csr"
    fast = csr if fast == "csr" else fast
    calls: list[str] = []
    _rig_timing(monkeypatch, calls, {fast: [0.001]})
    gen = torch.Generator().manual_seed(4)
    w, b = random_sparse(48, 32, 0.9, gen), torch.randn(48, generator=gen)
    op = make_projection(w, b, backend="auto")
    assert op.candidates == (csr, "dense") and op.kind == f"{csr}|dense"
    timing = 2 * 2  # an untimed warm-up and one timed call each: the slow one (20x) is out at once
    for n, expected_calls in ((8, timing + 1), (12, 1), (100, timing + 1)):  # 8 and 12 tokens share a timing
        calls.clear()
        x, r = torch.randn(32, n, generator=gen), torch.randn(48, n, generator=gen)
        out = torch.full((48, n), float("nan"))
        torch.testing.assert_close(op(x, residual=r, out=out), w @ x + b[:, None] + r, rtol=1e-4, atol=1e-4)
        assert len(calls) == expected_calls and calls[-1] == fast
        assert op.kind == fast and op.kind_for(n) == fast and op.held_kinds == {fast}
    assert sorted(op.plan) == [4, 7]  # one timing per power of two: 8 to 15 tokens, then 64 to 127


@pytest.mark.parametrize(
    ("dense_s", "csr_s", "rounds"),
    [
        # dense takes 100 ms at its first call (one-off costs land there: oneDNN builds its bf16 kernels
        # at the first call), then 9-10 ms, against CSR's steady 12 ms: the first call is never timed
        ([0.1, 0.010, 0.009], 0.012, "TIMING_ROUNDS"),
        # products of a fraction of a millisecond (batch 1): timed until one has run MIN_TIMING_S, at most
        # MAX_ROUNDS calls each, rather than twice
        ([0.00012, 0.0001], 0.00011, "MAX_ROUNDS"),
    ],
)
def test_a_close_race_is_timed_over_several_rounds_without_the_first_call(monkeypatch, dense_s, csr_s, rounds):
    """Candidates within 2x of each other are timed several times each after an untimed warm-up call, and
    the minimum counts."""
    from sparsebert.runtime import ops

    calls: list[str] = []
    _rig_timing(monkeypatch, calls, {"dense": dense_s}, others=csr_s)
    gen = torch.Generator().manual_seed(7)
    w = random_sparse(48, 32, 0.9, gen)
    op = make_projection(w, None, backend="auto")
    x = torch.randn(32, 10, generator=gen)
    torch.testing.assert_close(op(x), w @ x, rtol=1e-4, atol=1e-4)
    assert op.kind == "dense" and len(calls) == 2 * (1 + getattr(ops, rounds)) + 1


def test_dense_matrices_and_fixed_backends_are_not_timed():
    gen = torch.Generator().manual_seed(5)
    dense_w, sparse_w = torch.randn(16, 8, generator=gen), random_sparse(16, 8, 0.9, gen)
    assert make_projection(dense_w, None, backend="auto").candidates == ("dense",)
    op = make_projection(sparse_w, None, backend="torch")
    torch.testing.assert_close(op(x := torch.randn(8, 5, generator=gen)), sparse_w @ x)
    assert op.candidates == ("torch-csr",) and op.plan == {} and op.kind == "torch-csr"


def test_fastest_backend_offers_dense_bf16_where_native_and_stays_close(monkeypatch):
    """backend="fastest" adds dense bf16 on CPUs that run it natively (never where it is emulated); when
    it wins, the result is fp32 and bf16-close to the exact one."""
    from sparsebert.runtime import ops

    gen = torch.Generator().manual_seed(6)
    w, b = random_sparse(64, 32, 0.8, gen), torch.randn(64, generator=gen)
    monkeypatch.setattr(ops, "native_bf16", lambda device_type: False)
    assert "dense-bf16" not in make_projection(w, b, backend="fastest").candidates
    monkeypatch.setattr(ops, "native_bf16", lambda device_type: True)
    _rig_timing(monkeypatch, [], {"dense-bf16": [0.001]})
    op = make_projection(w, b, backend="fastest")
    assert op.candidates[-1] == "dense-bf16"
    x = torch.randn(32, 20, generator=gen)
    y, ref = op(x), w @ x + b[:, None]
    assert op.kind == "dense-bf16" and y.dtype == torch.float32
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())


def pruned_model(config, sparsity: float, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    Pruner.one_shot(model, sparsity)
    return model


def small(cls, **kw):
    if cls is DistilBertConfig:
        return DistilBertConfig(vocab_size=80, dim=64, n_layers=2, n_heads=4, hidden_dim=128, **kw)
    return cls(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, **kw)


def hidden_and_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=False)
        base = getattr(model, model.base_model_prefix)
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden, out.logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("config_cls", "attn", "expected_mode"),
    [
        (BertConfig, "sdpa", "encoder"),
        (BertConfig, "eager", "encoder"),
        (RobertaConfig, "sdpa", "encoder"),
        (DistilBertConfig, "sdpa", "linear"),
    ],
)
def test_sparsified_model_matches_the_dense_masked_model(config_cls, attn, expected_mode, backend):
    config = small(config_cls)
    config._attn_implementation = attn
    dense = pruned_model(config, 0.9)
    fast = copy.deepcopy(dense)
    report = sparsify(fast, backend=backend)
    assert report.mode == expected_mode
    assert "dense" not in report.kernels
    ids = torch.randint(5, 80, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    for m in (mask, None):
        h_ref, l_ref = hidden_and_logits(dense, ids, m)
        h, logits = hidden_and_logits(fast, ids, m)
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, l_ref, rtol=1e-4, atol=1e-5)


def _attention_reference(qkv: torch.Tensor, batch: int, heads: int, mask: torch.Tensor | None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(Q K^T / sqrt(d) + mask + bias) V in float64, from the feature-major fused Q/K/V, feature-major
    out; ``bias`` (heads, queries, keys)."""
    hidden, seq = qkv.shape[0] // 3, qkv.shape[1] // batch
    q, k, v = (t.double().reshape(heads, hidden // heads, batch, seq).permute(2, 0, 3, 1) for t in qkv.split(hidden))
    scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5
    if mask is not None:
        scores = scores + mask.double()[:, None, None, :]
    if bias is not None:
        scores = scores + bias.double()[None]
    return (torch.softmax(scores, -1) @ v).permute(1, 3, 0, 2).reshape(hidden, batch * seq).float()


@pytest.mark.skipif(not attention_available(), reason="the fused attention kernel needs AVX-512")
@pytest.mark.parametrize(("batch", "seq", "heads", "dim"), [(1, 128, 12, 64), (3, 21, 4, 16), (2, 150, 4, 16),
                                                             (1, 1, 4, 16), (2, 9, 2, 7), (1, 300, 2, 32)])  # fmt: skip
def test_fused_attention_matches_softmax_attention(batch, seq, heads, dim):
    """Every tail the kernel has: queries past a multiple of 16 and of its 128-query chunk, an odd key count
    and head size, one token; padding masks, a sequence with every key masked (uniform, as HF's eager)."""
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    qkv = 2 * torch.randn(3 * heads * dim, batch * seq, generator=gen)
    mask = torch.zeros(batch, seq)
    mask[-1, seq // 2 :] = torch.finfo(torch.float32).min
    if batch > 2:
        mask[1] = torch.finfo(torch.float32).min
    bias = 3 * torch.randn(heads, seq, seq, generator=gen)  # MPNet's relative positions: any table
    for m, b in ((None, None), (mask, None), (None, bias), (mask, bias)):
        out = torch.full((heads * dim, batch * seq), float("nan"))
        key_major = None if b is None else b.transpose(1, 2).contiguous()
        got = attention_fm(qkv, batch, heads, m, 1 / dim**0.5, out, key_major)
        torch.testing.assert_close(got, _attention_reference(qkv, batch, heads, m, b), rtol=1e-5, atol=2e-5)


def test_the_torch_attention_path_matches_where_the_kernel_does_not_run(monkeypatch):
    """Without AVX-512 (or with a per-query mask) the encoder's attention falls back to torch's batched GEMMs."""
    monkeypatch.setattr(engine, "attention_available", lambda: False)
    dense = pruned_model(small(BertConfig), 0.9)
    fast = copy.deepcopy(dense)
    sparsify(fast, mode="encoder")
    ids = torch.randint(5, 80, (3, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    for batch, m in ((ids[:1], None), (ids, mask)):
        torch.testing.assert_close(
            hidden_and_logits(fast, batch, m)[0], hidden_and_logits(dense, batch, m)[0], rtol=1e-4, atol=1e-4
        )


def test_reused_buffers_never_leak_between_calls():
    """The encoder keeps its activation buffers between calls: a result handed out must not change when
    the next call (another token count, then the same) reuses them, and a copy of the model works alone."""
    dense = pruned_model(small(BertConfig), 0.9)
    fast = copy.deepcopy(dense)
    sparsify(fast, mode="encoder")
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randint(5, 80, shape, generator=gen) for shape in ((2, 150), (1, 1), (1, 9), (2, 150))]
    first, single = hidden_and_logits(fast, inputs[0], None)[0], hidden_and_logits(fast, inputs[1], None)[0]
    kept = first.clone(), single.clone()  # one token: the transposed buffer is contiguous as it stands
    for ids in [*inputs[1:], inputs[0]]:
        torch.testing.assert_close(
            hidden_and_logits(fast, ids, None)[0], hidden_and_logits(dense, ids, None)[0], rtol=1e-4, atol=1e-4
        )
    assert torch.equal(first, kept[0]) and torch.equal(single, kept[1])
    twin = pickle.loads(pickle.dumps(copy.deepcopy(fast)))
    torch.testing.assert_close(hidden_and_logits(twin, inputs[1], None)[0], hidden_and_logits(fast, inputs[1], None)[0])


@pytest.mark.parametrize("kernel", [True, False])
def test_mpnet_runs_in_encoder_mode_with_its_relative_position_bias(kernel, monkeypatch):
    """MPNet (BERT-base's shapes in mpnet-base) adds a learnt relative-position bias to every layer's scores:
    the engine adds it too, so the whole stack runs feature-major and equals the dense model (padding,
    batch 1 and several sequences, longer sequences than buckets)."""
    from transformers import MPNetConfig

    if not kernel:
        monkeypatch.setattr(engine, "attention_available", lambda: False)
    dense = pruned_model(small(MPNetConfig), 0.9)
    with torch.no_grad():  # a bias large enough to matter (its init is N(0, 0.02))
        dense.mpnet.encoder.relative_attention_bias.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    fast = copy.deepcopy(dense)
    assert sparsify(fast).mode == "encoder" and isinstance(fast.mpnet.encoder, SparseEncoder)
    ids = torch.randint(5, 80, (3, 150), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 90:] = 0
    for batch, m in ((ids[:1, :40], None), (ids, mask), (ids[:1], mask[1:2])):
        for got, want in zip(hidden_and_logits(fast, batch, m), hidden_and_logits(dense, batch, m), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_encoder_mode_is_really_used_and_linear_mode_on_request():
    dense = pruned_model(small(BertConfig), 0.9)
    fast = copy.deepcopy(dense)
    sparsify(fast, mode="encoder")
    assert isinstance(fast.bert.encoder, SparseEncoder)
    other = copy.deepcopy(dense)
    sparsify(other, mode="linear")
    assert isinstance(other.bert.encoder.layer[0].attention.self.query, SparseLinear)
    with pytest.raises(SparseBertError, match="BERT- or MPNet-style"):
        sparsify(pruned_model(small(DistilBertConfig), 0.9), mode="encoder")
    with pytest.raises(SparseBertError, match="mode"):
        sparsify(copy.deepcopy(dense), mode="fast")


def test_mixed_sparsity_falls_back_per_matrix_and_stays_exact():
    dense = pruned_model(small(BertConfig), 0.95)
    with torch.no_grad():  # one matrix left dense, one fully pruned
        dense.bert.encoder.layer[0].intermediate.dense.weight.normal_()
        dense.bert.encoder.layer[1].output.dense.weight.zero_()
    fast = copy.deepcopy(dense)
    report = sparsify(fast, max_density=0.3)
    assert report.kernels.count("dense") == 1
    ids = torch.randint(5, 80, (2, 13))
    torch.testing.assert_close(
        hidden_and_logits(fast, ids, None)[0], hidden_and_logits(dense, ids, None)[0], rtol=1e-4, atol=1e-4
    )


def test_bench_command_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    from sparsebert.runtime import bench

    monkeypatch.setitem(
        bench.ARCHS,
        "minilm-l6",
        {
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "vocab_size": 100,
        },
    )
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "bench",
            "--arch",
            "minilm-l6",
            "--sparsity",
            "0.9,0.95",
            "--batch-sizes",
            "1,2",
            "--seq-len",
            "16",
            "--threads",
            "1",
            "--reps",
            "3",
            "--warmup",
            "1",
            "--baselines",
            "fp32,ort-int8",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    assert args.handler(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["sparsity"] > 0.94, r["batch_size"]) for r in results] == [(False, 1), (False, 2), (True, 1), (True, 2)]
    for r in results:
        assert {"batch_size", "seq_len", "threads", "sparsity", "dense_ms", "sparse_ms", "speedup"} <= set(r)
        assert list(r["baselines"]) == ["fp32", "ort-int8"] and r["speedup_vs_best_dense"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "vs best dense" in capsys.readouterr().out


def test_bench_on_a_compressed_folder(tmp_path, capsys):
    from sparsebert.export import export_compressed

    export_compressed(pruned_model(small(BertConfig), 0.95), tmp_path / "o")
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "bench",
            "--model",
            str(tmp_path / "o"),
            "--batch-size",
            "2",
            "--seq-len",
            "8",
            "--threads",
            "1",
            "--reps",
            "3",
            "--warmup",
            "1",
        ]
    )
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "95.0%" in out
    # the kernels each projection ran at batch 2 (timed at its first call: tiny matrices may run dense)
    line = next(x for x in out.splitlines() if x.startswith("kernels: b2 auto: encoder mode, "))
    counts = [part.split(" ") for part in line.split("mode, ")[1].split(", ")]
    assert sum(int(n) for n, _ in counts) == 8 and {k for _, k in counts} <= {"cpp-csr", "torch-csr", "dense"}


def test_onnx_export_matches_pytorch(tmp_path):
    from sparsebert.runtime.onnx_export import TOLERANCE, export_onnx, ort_session

    model = pruned_model(small(BertConfig), 0.9)
    report = export_onnx(model, tmp_path / "m.onnx", seq_len=16, quantize=True)
    assert report["max_abs_diff"] <= TOLERANCE
    options = ort_session(tmp_path / "m.onnx", 2).get_session_options()  # no spinning threads between runs
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (tmp_path / "m.int8.onnx").exists() and report["int8_mb"] < report["onnx_mb"]
    assert model.config._attn_implementation == "sdpa"  # restored after the export
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(5, 60, (1, 10)).numpy()
    ones = torch.ones(1, 10, dtype=torch.long).numpy()
    first = session.run(None, {"input_ids": ids, "attention_mask": ones, "token_type_ids": 0 * ones})[0]
    second = session.run(None, {"input_ids": ids, "attention_mask": ones, "token_type_ids": ones})[0]
    assert abs(first - second).max() > 1e-4  # the segment ids reach the graph (sentence-pair tasks)


def test_bench_times_every_dense_baseline_beside_the_sparse_engine():
    """fp32, bf16, ONNX Runtime fp32 and int8, each with its output difference from dense fp32; the best
    dense path is the fastest of them and the headline speedup is measured against it."""
    from sparsebert.runtime.bench import bench_model

    model = pruned_model(small(BertConfig), 0.9)
    names = ["fp32", "bf16", "ort-fp32", "ort-int8"]
    results = bench_model(model, [1, 3], 16, 1, "tiny", baselines=names, warmup=1, reps=3)
    for r in results:
        assert list(r.baselines) == names and r.dense_ms == r.baselines["fp32"]
        assert r.best_dense == min(r.baselines, key=r.baselines.get)
        assert r.speedup_vs_best_dense == pytest.approx(r.baselines[r.best_dense] / r.sparse_ms)
        assert set(r.max_abs_diff) == {"bf16", "ort-fp32", "ort-int8", "sparse"}
        assert r.max_abs_diff["sparse"] < 1e-4 and r.max_abs_diff["ort-fp32"] < 1e-4  # exact paths
        assert 1e-4 < r.max_abs_diff["ort-int8"] < 1.0 and 1e-4 < r.max_abs_diff["bf16"] < 1.0  # lossy ones


def test_baselines_auto_and_unknown_names():
    from sparsebert.hardware import native_bf16
    from sparsebert.runtime.baselines import resolve_baselines

    auto = resolve_baselines(["auto"])
    assert auto[0] == "fp32" and ("bf16" in auto) == native_bf16("cpu")  # never emulated bf16 by default
    assert "ort-int8" in auto  # onnxruntime is a development dependency
    assert resolve_baselines(["ort-int8", "bf16"]) == ["fp32", "bf16", "ort-int8"]
    with pytest.raises(SparseBertError, match="unknown baseline"):
        resolve_baselines(["int4"])


def test_the_kernel_cache_is_keyed_by_the_processor(monkeypatch):
    """The library is built with -march=native: a cache shared with another CPU must not be loaded."""
    from sparsebert.runtime import build

    def key() -> str:
        return build.build_key("source", build.FLAGS, "g++")

    here = key()
    cpu = build.cpu_info()
    assert cpu.get("flags") and here == key()  # stable on one machine
    monkeypatch.setattr(build, "cpu_info", lambda: {**cpu, "flags": cpu["flags"] + " amx_tile"})
    assert key() != here
    monkeypatch.setattr(build, "cpu_info", lambda: {**cpu, "model name": cpu.get("model name", "") + " (another)"})
    assert key() != here


def test_the_kernel_source_ships_as_package_data():
    """The C++ is a file of the package (declared in pyproject's package-data), not a string in Python:
    found through importlib.resources, with every function whose signature build.py declares."""
    from sparsebert.runtime import build

    source = build.source_path()
    assert source.is_file() and source.name == "sparse_kernels.cpp"
    text = source.read_text()
    for fn in ("spmm_csr_f32", "layer_norm_fm_f32", "attention_supported", "attention_fm_f32", "int8_supported",
               "quantize_b4", "spmm_b4_i8", "bf16_supported", "spmm_pairs_bf16", "to_bf16_fm",
               "attention_fm_bf16"):  # fmt: skip
        assert f" {fn}(" in text


def _broken_source(tmp_path, monkeypatch):
    """A C++ file with a syntax error, and a fresh kernel cache so that the real one is left alone."""
    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text('extern "C" int attention_supported() { return 1 }\n')  # no ';'
    return source


def test_strict_kernels_raise_one_line_on_a_source_that_does_not_compile(tmp_path, monkeypatch):
    from sparsebert.runtime import build

    source = _broken_source(tmp_path, monkeypatch)
    monkeypatch.setenv("SPARSEBERT_KERNELS_STRICT", "1")
    with pytest.raises(SparseBertError, match="do not compile") as err:
        build.build_library(source)
    message = str(err.value)
    assert "\n" not in message and "broken.cpp:1" in message and "error" in message and "STRICT" in message
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


def test_kernels_that_do_not_compile_fall_back_with_an_error_log(tmp_path, monkeypatch, caplog):
    """Not strict: the torch path takes over, but the compiler's error is logged at error level, not hidden
    in a warning."""
    from sparsebert.runtime import build

    source = _broken_source(tmp_path, monkeypatch)
    monkeypatch.delenv("SPARSEBERT_KERNELS_STRICT", raising=False)
    with caplog.at_level("WARNING", logger="sparsebert.runtime.build"):
        assert build.build_library(source) is None
    [record] = caplog.records
    assert record.levelname == "ERROR" and "broken.cpp:1" in record.getMessage() and "expected" in record.getMessage()


def test_without_a_compiler_the_kernels_warn_once_or_raise_when_strict(monkeypatch, caplog):
    from sparsebert.runtime import build

    monkeypatch.setattr(build, "compiler", lambda: None)
    with caplog.at_level("WARNING", logger="sparsebert.runtime.build"):
        assert build.build_library(strict_mode=False) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    with pytest.raises(SparseBertError, match="no C\\+\\+ compiler"):
        build.build_library(strict_mode=True)


def _int8_reference(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the VNNI kernel computes, in torch: int8 weights per row, int8 activations per token."""
    s_w = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    s_x = (x.abs().amax(0) * torch.tensor(1 / 127, dtype=torch.float32)).clamp_min(1e-30)
    q_w, q_x = torch.round(w / s_w[:, None]), torch.round(x * (1 / s_x))
    return (q_w.double() @ q_x.double()).float() * s_w[:, None] * s_x


@pytest.mark.skipif(not int8_available(), reason="needs AVX512-VNNI")
@pytest.mark.parametrize("n", [1, 17, 128, 300])
def test_int8_kernel_computes_the_quantized_product(n):
    """Block-CSR int8 products (1x4 blocks) against the same quantization done in torch: equal up to
    float rounding, and within ~2% of the fp32 product; bias, residual and out as in spmm."""
    gen = torch.Generator().manual_seed(n)
    m, k = 40, 96
    w = torch.randn(m, k, generator=gen) * (torch.rand(m, k // 4, generator=gen) < 0.3).repeat_interleave(4, 1)
    w[5] = 0  # an empty row
    x, b, r = torch.randn(k, n, generator=gen), torch.randn(m, generator=gen), torch.randn(m, n, generator=gen)
    out = torch.full((m, n), float("nan"))
    y = spmm_int8(BlockInt8Matrix.from_dense(w), x, b, r, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, _int8_reference(w, x) + b[:, None] + r, rtol=1e-5, atol=1e-4)
    assert float((y - (w @ x + b[:, None] + r)).abs().max()) < 0.02 * float((w @ x).abs().max())


@pytest.mark.skipif(not int8_available(), reason="needs AVX512-VNNI")
def test_int8_products_of_any_size_in_turn_share_one_scratch_buffer():
    """The quantized activations live in a buffer kept per thread: products of growing and shrinking
    sizes, one after the other in a fresh thread, each get their own correct result, and the buffer grows
    only when a product needs more."""
    from concurrent.futures import ThreadPoolExecutor

    from sparsebert.runtime.int8 import scratch_size

    gen = torch.Generator().manual_seed(9)
    shapes = [(24, 192, 300), (40, 96, 17), (24, 192, 1), (16, 384, 200)]

    def products() -> list[int]:
        sizes = [scratch_size()]
        for m, k, n in shapes:
            w = torch.randn(m, k, generator=gen) * (torch.rand(m, k // 4, generator=gen) < 0.3).repeat_interleave(4, 1)
            x = torch.randn(k, n, generator=gen)
            torch.testing.assert_close(spmm_int8(BlockInt8Matrix.from_dense(w), x), _int8_reference(w, x),
                                       rtol=1e-5, atol=1e-4)  # fmt: skip
            sizes.append(scratch_size())
        return sizes

    with ThreadPoolExecutor(1) as fresh_thread:
        sizes = fresh_thread.submit(products).result()
    assert sizes == [0] + [192 * 304] * 3 + [384 * 208]  # grown only when needed (16 tokens a step)


@pytest.mark.skipif(not int8_available(), reason="needs AVX512-VNNI")
def test_fastest_backend_offers_int8_on_block_pruned_matrices():
    """backend="fastest": a matrix pruned in 1x4 blocks may also run the (lossy) int8 kernel, an
    unstructured one only the exact ones; whatever the timing picks, the model stays close."""
    dense = AutoModelForSequenceClassification.from_config(small(BertConfig)).eval()
    Pruner.one_shot(dense, 0.9, block=4)
    with torch.no_grad():
        w = dense.bert.encoder.layer[1].attention.output.dense.weight
        w.normal_(generator=torch.Generator().manual_seed(2)).mul_(torch.rand(w.shape) > 0.95)
    fast = copy.deepcopy(dense)
    ops = sparsify(fast, backend="fastest").ops
    assert ["cpp-int8" in op.candidates for op in ops] == [True] * 5 + [False] + [True] * 2
    ids = torch.randint(5, 80, (2, 19), generator=torch.Generator().manual_seed(0))
    (h, logits), (h_ref, l_ref) = hidden_and_logits(fast, ids, None), hidden_and_logits(dense, ids, None)
    assert float((h - h_ref).abs().max()) < 0.1 and float((logits - l_ref).abs().max()) < 0.05


@pytest.mark.skipif(not int8_available(), reason="needs AVX512-VNNI")
def test_int8_backend_runs_block_pruned_models_and_keeps_the_rest_exact():
    """backend="int8": matrices pruned in 1x4 blocks run the VNNI kernel, an unstructured or dense one keeps
    its exact kernel; the model stays close to the dense one (int8 is lossy)."""
    dense = AutoModelForSequenceClassification.from_config(small(BertConfig)).eval()
    Pruner.one_shot(dense, 0.9, block=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer = dense.bert.encoder.layer[1]
        layer.output.dense.weight.normal_(generator=gen)  # dense: not run sparse at all
        unstructured = layer.attention.output.dense.weight  # 95% unstructured: ~1 block in 5 kept, ~1/4 full
        unstructured.mul_(torch.rand(unstructured.shape, generator=gen) > 0.95)
    fast = copy.deepcopy(dense)
    kinds = sparsify(fast, backend="int8").kernels
    # encoder mode, 4 projections per layer (Q, K, V fused): qkv, attention output, FFN up, FFN down
    assert kinds == ["cpp-int8"] * 5 + ["cpp-csr", "cpp-int8", "dense"]
    ids = torch.randint(5, 80, (2, 19), generator=torch.Generator().manual_seed(0))
    (h, logits), (h_ref, l_ref) = hidden_and_logits(fast, ids, None), hidden_and_logits(dense, ids, None)
    assert float((h - h_ref).abs().max()) < 0.1 and float((logits - l_ref).abs().max()) < 0.05


def test_interleaved_timing_turns_the_order_and_keeps_each_time_with_its_path():
    """No path always runs right after the same other one (ONNX Runtime's threads slowed whichever did),
    and each median belongs to its own callable (one of them sleeps 20 ms)."""
    from sparsebert.runtime.bench import median_ms

    order: list[str] = []
    fns = [lambda: order.append("a"), lambda: (order.append("b"), time.sleep(0.02)), lambda: order.append("c")]
    ms = median_ms(fns, warmup=0, reps=3, budget_s=60)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert ms[1] >= 20 and ms[0] < 20 and ms[2] < 20


def test_threads_sharing_one_sparsified_model_each_get_their_own_results():
    """A served model is called from several threads at once: each has its own activation buffers, and the
    timed kernel choice (made by whichever thread sees an input size first) never mixes their results."""
    from concurrent.futures import ThreadPoolExecutor

    dense = pruned_model(small(BertConfig), 0.9)
    fast = copy.deepcopy(dense)
    sparsify(fast)
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randint(5, 80, shape, generator=gen) for shape in [(2, 150), (1, 7), (3, 40), (1, 1)] * 3]
    expected = [hidden_and_logits(dense, ids, None)[0] for ids in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda ids: hidden_and_logits(fast, ids, None)[0], inputs))
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bench_times_several_backends_in_the_same_rounds_with_their_useful_flops():
    """One result per backend and batch size, sharing the dense timings of the same rounds; GFLOP/s counts the
    work the run report counts (forward_flops), read against this CPU's measured fp32 GEMM rate."""
    from sparsebert.runtime.bench import bench_model, forward_flops

    model = pruned_model(small(BertConfig), 0.9)
    results = bench_model(model, [1, 2], 16, 1, "tiny", backend=["auto", "cpp"], warmup=1, reps=3)
    assert [(r.batch_size, r.backend) for r in results] == [(1, "auto"), (1, "cpp"), (2, "auto"), (2, "cpp")]
    assert results[0].baselines == results[1].baselines and results[0].max_abs_diff["sparse"] < 1e-4
    nonzeros = sum(int((m.weight != 0).sum()) for n, m in model.named_modules() if n.startswith("bert.encoder")
                   and isinstance(m, torch.nn.Linear))  # fmt: skip
    head = 2 * 64 * 64 + 2 * 64 * 2  # pooler and classifier, first token only (report.flops_per_sequence)
    assert forward_flops(model, 2, 16) == 2 * nonzeros * 32 + 4 * 2 * 2 * 16 * 16 * 64 + 2 * head
    for r in results:
        assert r.gflops == pytest.approx(forward_flops(model, r.batch_size, 16) / r.sparse_ms / 1e6)
        assert 0 < r.share_of_gemm < 10


@pytest.mark.skipif(not attention_available(), reason="the fused attention kernel needs AVX-512")
def test_a_padding_mask_expanded_per_query_still_runs_the_fused_kernel(monkeypatch):
    """HF's sdpa path hands the encoder one mask row per query; rows that are all the same become one row per
    sequence again, so a padded batch runs the fused kernel (it ran torch's attention), with the same output."""
    config = small(BertConfig)
    config._attn_implementation = "sdpa"
    dense = pruned_model(config, 0.9)
    fast = copy.deepcopy(dense)
    sparsify(fast)
    calls = []
    real = engine.attention_fm
    monkeypatch.setattr(engine, "attention_fm", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ids = torch.randint(5, 80, (3, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    got, want = hidden_and_logits(fast, ids, mask), hidden_and_logits(dense, ids, mask)
    assert calls
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
