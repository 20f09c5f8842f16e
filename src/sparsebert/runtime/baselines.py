"""The dense paths a user would pick instead of the sparse engine, built to be timed beside it.

A sparse engine is only worth shipping if it beats what a user already has on the same CPU: dense
PyTorch in fp32, dense bf16 where the CPU computes bf16 natively (AMX, AVX512-BF16; elsewhere oneDNN
emulates it and it is slower than fp32), and ONNX Runtime in fp32 or with int8 dynamic quantization (the
usual CPU deployment of a BERT). Each baseline is a callable ``(input_ids, attention_mask,
token_type_ids=None) -> output`` returning the model's first output in fp32, so the benchmark can time
them interleaved and report each one's difference from dense fp32, and ``bench/engine_accuracy.py`` can
score each on a dev set.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.hardware import native_bf16
from sparsebert.runtime.onnx_export import FirstOutput, export_graph, ort_session, quantize_int8, uses_token_types

BASELINES = ("fp32", "bf16", "ort-fp32", "ort-int8")
Forward = Callable[..., torch.Tensor]  # (input_ids, attention_mask, token_type_ids=None) -> fp32 output


def available_baselines() -> list[str]:
    """What ``auto`` means on this machine: fp32; bf16 only where native; ORT when it is installed."""
    names = ["fp32"] + (["bf16"] if native_bf16("cpu") else [])
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        names += ["ort-fp32", "ort-int8"]
    return names


def resolve_baselines(names: list[str]) -> list[str]:
    """``["auto"]`` -> this machine's; otherwise the names given, checked, fp32 always first."""
    if names == ["auto"]:
        return available_baselines()
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise SparseBertError(f"unknown baseline(s) {', '.join(unknown)}; choose from auto, {', '.join(BASELINES)}")
    return ["fp32"] + [n for n in BASELINES[1:] if n in names]


def first_output(model: nn.Module) -> Forward:
    """``model`` as a callable returning its first output in fp32."""
    wrapper = FirstOutput(model)
    return lambda ids, mask, types=None: wrapper(ids, mask, types).float()


def build_baselines(model: nn.Module, names: list[str], seq_len: int, threads: int) -> dict[str, Forward]:
    """One forward per baseline name (see ``resolve_baselines``), built from the dense ``model``."""
    forwards: dict[str, Forward] = {}
    for name in names:
        if name == "fp32":
            forwards[name] = first_output(model)
        elif name == "bf16":  # weights and activations in bf16, as model.to(torch.bfloat16) gives a user
            forwards[name] = first_output(copy.deepcopy(model).to(torch.bfloat16))
    ort_names = [n for n in names if n.startswith("ort-")]
    if ort_names:
        forwards.update(_onnx_runtime(model, ort_names, seq_len, threads))
    return forwards


def _onnx_runtime(model: nn.Module, names: list[str], seq_len: int, threads: int) -> dict[str, Forward]:
    """Export once to a temporary folder, quantize if asked, and keep the sessions (files can go)."""
    forwards: dict[str, Forward] = {}
    types = uses_token_types(model)
    with tempfile.TemporaryDirectory(prefix="sparsebert-ort-") as tmp:
        path = export_graph(model, Path(tmp) / "model.onnx", seq_len)
        for name in names:
            graph = path if name == "ort-fp32" else quantize_int8(path)
            forwards[name] = _session_forward(ort_session(graph, threads), types)
    return forwards


def _session_forward(session, token_types: bool) -> Forward:
    def forward(ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if token_types:
            feeds["token_type_ids"] = (torch.zeros_like(ids) if types is None else types).numpy()
        return torch.from_numpy(session.run(None, feeds)[0])

    return forward
