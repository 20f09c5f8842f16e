"""CLI wiring for ``sparsebert export``, ``sparsebert bench`` and ``sparsebert onnx``.

Each command's options are declared once, in a dataclass (flags, YAML ``--config`` and API alike, as
for the training commands); ``register_commands(subparsers)`` adds the three sub-commands, each with a
``handler`` the main CLI dispatches to. Heavy imports happen inside the handlers to keep ``--help`` fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsebert.errors import SparseBertError
from sparsebert.options import add_arguments, check_choices, config_from_args, opt, require
from sparsebert.pruning import PRUNE_BLOCKS
from sparsebert.runtime.ops import SPARSE_BACKENDS


@dataclass
class ExportConfig:
    """``sparsebert export``: a pruned model in the compressed sparse format."""

    model: str | None = opt(None, "pruned model folder (or any name `sparsebert.load` accepts)", group="export")
    output_dir: str | None = opt(None, "the compressed model folder", group="export")
    values: str = opt("fp32", "dtype of the stored non-zeros (bf16: exactly what --backend bf16 computes with)",
                      choices=("fp32", "fp16", "bf16"), group="export")  # fmt: skip
    min_sparsity: float = opt(0.5, "store a matrix sparsely from this sparsity on", group="export")
    overwrite: bool = opt(False, "replace a non-empty output folder", group="export")
    json: str | None = opt(None, "also write the size report here", group="export")


@dataclass
class BenchConfig:
    """``sparsebert bench``: dense vs sparse CPU latency and throughput, side by side."""

    model: str | None = opt(None, "pruned model folder (ordinary or compressed)", group="bench")
    arch: str | None = opt(
        None, "a random model of this shape, pruned here", choices=("bert-base", "minilm-l6"), group="bench"
    )
    sparsity: list[float] = opt(help="with --arch: one or more, e.g. 0.9,0.95", factory=lambda: [0.95], group="bench")
    prune_block: int = opt(1, "with --arch: prune in groups of this many input weights (4 for --backend int8)",
                           choices=PRUNE_BLOCKS, group="bench")  # fmt: skip
    batch_sizes: list[int] = opt(help="batch sizes to time", factory=lambda: [1, 32], group="bench")
    seq_len: int = opt(128, "tokens per sentence", group="bench")
    threads: int = opt(2, "CPU threads", group="bench")
    mode: str = opt("auto", "sparse engine mode", choices=("auto", "encoder", "linear"), group="bench")
    backend: list[str] = opt(help="sparse kernels, one or more timed side by side (e.g. auto,bf16): auto (per "
                             "matrix the faster exact one, timed), fastest (also the lossy ones), bf16 (AVX512-BF16: "
                             "bf16 activations, per matrix bf16 CSR or dense bf16, timed), or fixed: cpp, torch, "
                             "int8 (VNNI, --prune-block 4 models)",
                             choices=SPARSE_BACKENDS, factory=lambda: ["auto"], group="bench")  # fmt: skip
    max_density: float | None = opt(None, "densest matrix run sparse (default 0.3; 0.5 when timed)", group="bench")
    baselines: list[str] = opt(
        help="dense paths timed beside the sparse engine: auto (fp32, bf16 where the CPU has it natively, "
        "ONNX Runtime fp32/int8 where installed) or a list of fp32,bf16,ort-fp32,ort-int8",
        factory=lambda: ["auto"],
        group="bench",
    )
    reps: int = opt(20, "timed runs per side (fewer if over --budget)", group="bench")
    warmup: int = opt(2, "untimed runs first", group="bench")
    budget: float = opt(30.0, "seconds per configuration before stopping reps", group="bench")
    json: str | None = opt(None, "write {'results': [...]} here", group="bench")
    plot: str | None = opt(None, "PNG of sentences/s vs compression ratio (several sparsities)", group="bench")

    def __post_init__(self) -> None:
        check_choices(self)
        if (self.model is None) == (self.arch is None):
            raise SparseBertError("give exactly one of --model and --arch")
        if any(not 0.0 <= v < 1.0 for v in self.sparsity):
            raise SparseBertError(f"--sparsity values must lie in [0, 1), got {self.sparsity}")


@dataclass
class OnnxConfig:
    """``sparsebert onnx``: a pruned model in ONNX, checked against PyTorch."""

    model: str | None = opt(None, "pruned model folder", group="onnx")
    output: str | None = opt(None, "the .onnx file", group="onnx")
    seq_len: int = opt(128, "tokens per sentence of the traced input", group="onnx")
    quantize: bool = opt(False, "also write an int8 dynamically quantized model", group="onnx")
    threads: int | None = opt(None, "threads for the PyTorch and ONNX Runtime timings", group="onnx")


def _handler(cls: type, run: Callable, required: tuple[str, ...]) -> Callable[[argparse.Namespace], int]:
    """Parsed flags (and ``--config``) -> the checked configuration -> ``run(config)``."""

    def handle(args: argparse.Namespace) -> int:
        config = config_from_args(cls, args)
        require(config, *required)
        return run(config)

    return handle


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export``, ``bench`` and ``onnx`` to the ``sparsebert`` sub-command parser."""
    for name, cls, run, required in (
        ("export", ExportConfig, cmd_export, ("model", "output_dir")),
        ("bench", BenchConfig, cmd_bench, ()),
        ("onnx", OnnxConfig, cmd_onnx, ("model", "output")),
    ):
        p = subparsers.add_parser(name, help=(cls.__doc__ or "").split(": ", 1)[-1].rstrip("."))
        p.add_argument("--config", help="YAML recipe of options; flags override it")
        add_arguments(p, cls)
        p.set_defaults(handler=_handler(cls, run, required))


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def cmd_export(args: ExportConfig) -> int:
    from sparsebert.export import export_compressed

    r = export_compressed(
        args.model, args.output_dir, values=args.values, min_sparsity=args.min_sparsity, overwrite=args.overwrite
    )
    print(f"exported {args.model} -> {r.output_dir} (values {r.values})")
    print(
        f"pruned layers: {r.sparse_matrices} matrices as CSR, {r.dense_matrices_kept} kept dense, "
        f"sparsity {100 * r.pruned_sparsity:.2f}%"
    )
    print(f"{'':<28} {'bytes':>12}")
    print(f"{'pruned layers, dense fp32':<28} {_mb(r.pruned_dense_fp32_bytes):>12}")
    print(f"{'pruned layers, CSR':<28} {_mb(r.pruned_sparse_bytes):>12}   ({r.pruned_ratio:.1f}x smaller)")
    print(f"{'source weight files':<28} {_mb(r.source_bytes):>12}")
    print(
        f"{'output folder (all files)':<28} {_mb(r.output_bytes):>12}"
        + (f"   ({r.source_bytes / r.output_bytes:.2f}x smaller)" if r.source_bytes else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r.as_dict(), indent=2) + "\n")
    return 0


def cmd_bench(args: BenchConfig) -> int:
    import torch

    from sparsebert.runtime.baselines import resolve_baselines
    from sparsebert.runtime.bench import (
        bench_model,
        format_table,
        machine,
        plot_sweep,
        random_pruned_model,
        results_json,
    )

    timing = {"warmup": args.warmup, "reps": args.reps, "budget_s": args.budget}
    common = {"mode": args.mode, "backend": args.backend, "max_density": args.max_density, **timing}
    common["baselines"] = resolve_baselines(args.baselines)
    torch.set_num_threads(args.threads)
    print(f"{machine()}, {args.threads} threads; dense baselines: {', '.join(common['baselines'])}", flush=True)
    results = []
    if args.model:
        from sparsebert.export import load

        model = load(args.model)
        results += bench_model(model, args.batch_sizes, args.seq_len, args.threads, Path(args.model).name, **common)
        print(format_table(results), flush=True)
    else:
        for s in args.sparsity:
            model = random_pruned_model(args.arch, s, block=args.prune_block)
            new = bench_model(model, args.batch_sizes, args.seq_len, args.threads, args.arch, **common)
            results += new
            print(format_table(new), flush=True)
            del model
        if len(args.sparsity) > 1:
            print("\nall results:\n" + format_table(results))
    print("kernels: " + "; ".join(f"b{r.batch_size} {r.backend}: {r.kernels}" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results_json(results), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_onnx(args: OnnxConfig) -> int:
    from sparsebert.runtime.onnx_export import export_onnx

    report = export_onnx(args.model, args.output, seq_len=args.seq_len, quantize=args.quantize, threads=args.threads)
    for key, value in report.items():
        print(f"{key:<28} {value}")
    if report.get("max_abs_diff", 1.0) > report.get("tolerance", 0.0):
        raise SparseBertError("ONNX outputs differ from PyTorch beyond the tolerance")
    return 0
