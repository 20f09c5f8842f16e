"""ONNX export of a pruned model, checked against PyTorch, with optional int8 dynamic quantization.

onnx / onnxruntime are optional: they are imported only here, so the package works without them. The
exported graph is the dense masked model (ONNX Runtime has no unstructured-sparse GEMM on CPU); its value
is portability, and int8 dynamic quantization is the CPU speed lever on that path.

The traced wrapper, ``FirstOutput``, lives here because the exporter needs it; ``runtime.baselines`` (which
times ONNX Runtime beside the other dense paths) imports this module, never the reverse, so the two have
no import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.runtime.timing import median_ms

TOLERANCE = 1e-4


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise SparseBertError(f"ONNX export needs the optional package {module!r} (pip install {module})") from None


class FirstOutput(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> the model's logits (task models) or last hidden
    state: plain tensors in and out, as the ONNX exporter and the timed paths want them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if getattr(out, "start_logits", None) is not None:  # a span head: (batch, tokens, 2), as qa_outputs gives
            return torch.stack((out.start_logits, out.end_logits), dim=-1)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def uses_token_types(model: nn.Module) -> bool:
    """Sentence-pair models (BERT, ELECTRA) need token_type_ids; RoBERTa (one type) and DistilBERT do not."""
    return getattr(model.config, "type_vocab_size", 1) > 1


def _inputs(vocab: int, batch: int, seq: int, seed: int, types: bool) -> dict[str, torch.Tensor]:
    """Random inputs with some padding (row 0) and, for pair models, a second segment (token type 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # some padding, so the mask path is checked too
    inputs = {"input_ids": ids, "attention_mask": mask}
    if types:
        token_types = torch.zeros_like(ids)
        token_types[:, seq // 3 :] = 1
        inputs["token_type_ids"] = token_types
    return inputs


def _median_ms(fn, reps: int = 10) -> float:
    return median_ms([fn], warmup=1, reps=reps, budget_s=float("inf"))[0]


def export_onnx(
    model: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    seq_len: int = 128,
    quantize: bool = False,
    threads: int | None = None,
) -> dict:
    """Export, verify on random padded inputs (max |diff| <= 1e-4 expected), optionally quantize to int8."""
    _require("onnxruntime")
    _require("onnx")
    if not isinstance(model, nn.Module):
        from sparsebert.export import load

        model = load(model)
    model.eval()
    if threads:
        torch.set_num_threads(threads)
    return _export_checked(model, Path(output), seq_len, quantize, threads)


def export_graph(model: nn.Module, output: Path, seq_len: int) -> Path:
    """The model as an ONNX graph (dynamic batch and length) returning its logits or last hidden state."""
    _require("onnx")
    _require("onnxscript")
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # the exporter traces eager attention most reliably
    try:
        example = _inputs(model.config.vocab_size, 2, seq_len, 0, uses_token_types(model))
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.max_position_embeddings)
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(
            FirstOutput(model).eval(),
            tuple(example.values()),
            str(output),
            input_names=list(example),
            output_names=["output"],
            dynamic_shapes={name: {0: batch, 1: seq} for name in example},
            dynamo=True,
            external_data=False,
            verbose=False,  # no progress lines on stdout
        )
    finally:
        model.config._attn_implementation = attn
    return output


def ort_session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (its default when None).

    Its threads do not spin-wait between runs: by default they keep polling for a while after each
    run, which steals the cores from whatever runs next in the same process (the sparse engine, timed
    interleaved with it, ran 2-10x slower).
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_int8(path: Path) -> Path:
    """Dynamic int8 quantization of the graph's weights (activations quantized at run time)."""
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q_path = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(str(path), str(q_path), weight_type=QuantType.QInt8)
    return q_path


def _export_checked(model: nn.Module, output: Path, seq_len: int, quantize: bool, threads: int | None) -> dict:
    wrapper = FirstOutput(model).eval()
    types = uses_token_types(model)
    export_graph(model, output, seq_len)
    report: dict = {"onnx_file": str(output), "onnx_mb": round(output.stat().st_size / 1e6, 2), "tolerance": TOLERANCE}
    session = ort_session(output, threads)
    check = _inputs(model.config.vocab_size, 3, max(8, seq_len // 2), 1, types)
    feeds = {name: t.numpy() for name, t in check.items()}
    with torch.no_grad():
        ref = wrapper(*check.values())
    got = torch.from_numpy(session.run(None, feeds)[0])
    report["max_abs_diff"] = float((got - ref).abs().max())
    report["max_rel_diff"] = float(((got - ref).abs() / ref.abs().clamp_min(1e-3)).max())
    one = _inputs(model.config.vocab_size, 1, seq_len, 0, types)
    one["attention_mask"] = torch.ones_like(one["attention_mask"])
    bench_feeds = {name: t.numpy() for name, t in one.items()}
    with torch.no_grad():
        report["torch_ms_b1"] = round(_median_ms(lambda: wrapper(*one.values())), 2)
    report["onnx_ms_b1"] = round(_median_ms(lambda: session.run(None, bench_feeds)), 2)
    if quantize:
        q_path = quantize_int8(output)
        q_session = ort_session(q_path, threads)
        q_out = torch.from_numpy(q_session.run(None, feeds)[0])
        report["int8_file"] = str(q_path)
        report["int8_mb"] = round(q_path.stat().st_size / 1e6, 2)
        report["int8_max_abs_diff"] = float((q_out - ref).abs().max())
        cos = torch.nn.functional.cosine_similarity(q_out.flatten(1), ref.flatten(1), dim=-1)
        report["int8_min_cosine"] = float(cos.min())
        if ref.dim() == 2:  # classification logits: how often the int8 model picks the same class
            report["int8_argmax_agreement"] = float((q_out.argmax(-1) == ref.argmax(-1)).float().mean())
        report["int8_ms_b1"] = round(_median_ms(lambda: q_session.run(None, bench_feeds)), 2)
    return report
