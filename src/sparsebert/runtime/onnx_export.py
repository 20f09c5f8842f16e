"""ONNX export of a pruned model, checked against PyTorch, with optional int8 dynamic quantization.

onnx / onnxruntime are optional: they are imported only here, so the package works without them. The
exported graph is the dense masked model (ONNX Runtime has no unstructured-sparse GEMM on CPU); its value
is portability, and int8 dynamic quantization is the CPU speed lever on that path.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from sparsebert.errors import SparseBertError

TOLERANCE = 1e-4


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise SparseBertError(f"ONNX export needs the optional package {module!r} (pip install {module})") from None


class _Logits(nn.Module):
    """A plain (input_ids, attention_mask) -> first-output wrapper: one tensor in, one tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _inputs(vocab: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # some padding, so the mask path is checked too
    return ids, mask


def _median_ms(fn, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def export_onnx(
    model: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    seq_len: int = 128,
    quantize: bool = False,
    threads: int | None = None,
) -> dict:
    """Export, verify on random padded inputs (max |diff| <= 1e-4 expected), optionally quantize to int8."""
    ort = _require("onnxruntime")
    _require("onnx")
    if not isinstance(model, nn.Module):
        from sparsebert.export import load

        model = load(model)
    model.eval()
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # the exporter traces eager attention most reliably
    try:
        if threads:
            torch.set_num_threads(threads)
        return _export_checked(model, Path(output), seq_len, quantize, ort, threads)
    finally:
        model.config._attn_implementation = attn


def _export_checked(model: nn.Module, output: Path, seq_len: int, quantize: bool, ort, threads: int | None) -> dict:
    wrapper = _Logits(model).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    ids, mask = _inputs(model.config.vocab_size, 2, seq_len, 0)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.max_position_embeddings)
    torch.onnx.export(
        wrapper,
        (ids, mask),
        str(output),
        input_names=["input_ids", "attention_mask"],
        output_names=["output"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        dynamo=True,
        external_data=False,
    )
    report: dict = {"onnx_file": str(output), "onnx_mb": round(output.stat().st_size / 1e6, 2), "tolerance": TOLERANCE}
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    check_ids, check_mask = _inputs(model.config.vocab_size, 3, max(8, seq_len // 2), 1)
    feeds = {"input_ids": check_ids.numpy(), "attention_mask": check_mask.numpy()}
    with torch.no_grad():
        ref = wrapper(check_ids, check_mask)
    got = torch.from_numpy(session.run(None, feeds)[0])
    report["max_abs_diff"] = float((got - ref).abs().max())
    report["max_rel_diff"] = float(((got - ref).abs() / ref.abs().clamp_min(1e-3)).max())
    bench_feeds = {"input_ids": ids[:1].numpy(), "attention_mask": torch.ones_like(ids[:1]).numpy()}
    with torch.no_grad():
        report["torch_ms_b1"] = round(_median_ms(lambda: wrapper(ids[:1], torch.ones_like(ids[:1]))), 2)
    report["onnx_ms_b1"] = round(_median_ms(lambda: session.run(None, bench_feeds)), 2)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q_path = output.with_name(output.stem + ".int8.onnx")
        quantize_dynamic(str(output), str(q_path), weight_type=QuantType.QInt8)
        q_session = ort.InferenceSession(str(q_path), options, providers=["CPUExecutionProvider"])
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
