"""Facts about the hardware this process runs on, for training and the CPU runtime alike.

A leaf module: it imports torch and nothing of sparsebert, so the runtime (``runtime.ops``,
``runtime.baselines``) can ask what the processor computes natively without importing the training
loop (``train``, and with it accelerate). What the C++ kernels' build needs from the processor
(``cpu_info``: model name, instruction-set flags) stays with that build, in ``runtime.build``.
"""

from __future__ import annotations

import os

import torch


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 matrix products in hardware (not emulated)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":  # AMX tiles (Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4)
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` becomes ``bf16`` where the hardware runs it natively, ``no`` (fp32) elsewhere.

    On a CPU without bf16 instructions oneDNN emulates it and a step is ~2.6x slower than in fp32
    (BENCHMARKS.md, "Training cost"), so auto never picks it there. (The choices are checked where
    the option is declared, ``config.PRECISIONS``.)
    """
    if choice != "auto":
        return choice
    device_type = "cuda" if torch.cuda.is_available() and not forced_cpu() else "cpu"
    return "bf16" if native_bf16(device_type) else "no"


def forced_cpu() -> bool:
    """Whether accelerate was told to stay on the CPU although a GPU is there."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
