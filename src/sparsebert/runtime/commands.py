"""CLI wiring for ``sparsebert export``, ``sparsebert bench`` and ``sparsebert onnx``.

``register_commands(subparsers)`` adds the three sub-commands; each sets ``handler`` so the main CLI can
dispatch with ``args.handler(args)``. Heavy imports happen inside the handlers to keep ``--help`` fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsebert.errors import SparseBertError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError("sparsities must lie in [0, 1)")
    return values


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export``, ``bench`` and ``onnx`` to the ``sparsebert`` sub-command parser."""
    p = subparsers.add_parser("export", help="save a pruned model in the compressed sparse format")
    p.add_argument("--model", required=True, help="pruned model folder (or any name `sparsebert.load` accepts)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--values", choices=["fp32", "fp16"], default="fp32", help="dtype of the stored non-zeros")
    p.add_argument("--min-sparsity", type=float, default=0.5, help="store a matrix sparsely from this sparsity on")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", help="also write the size report here")
    p.set_defaults(handler=cmd_export)

    p = subparsers.add_parser("bench", help="dense vs sparse CPU latency and throughput, side by side")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pruned model folder (ordinary or compressed)")
    src.add_argument("--arch", choices=["bert-base", "minilm-l6"], help="random model of this shape, pruned here")
    p.add_argument("--sparsity", type=_float_list, default=[0.95], help="with --arch: one or more, e.g. 0.9,0.95")
    p.add_argument("--batch-sizes", "--batch-size", type=_int_list, default=[1, 32], dest="batch_sizes")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["auto", "encoder", "linear"], default="auto")
    p.add_argument("--backend", choices=["auto", "cpp", "torch"], default="auto")
    p.add_argument("--max-density", type=float, help="densest matrix still run sparse (default: measured)")
    p.add_argument("--reps", type=int, default=20, help="timed runs per side (fewer if over --budget)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=30.0, help="seconds per configuration before stopping reps")
    p.add_argument("--json", help="write {'results': [...]} here")
    p.add_argument("--plot", help="PNG of sentences/s vs compression ratio (use with several sparsities)")
    p.set_defaults(handler=cmd_bench)

    p = subparsers.add_parser("onnx", help="export a pruned model to ONNX and check it against PyTorch")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True, help="the .onnx file")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quantize", action="store_true", help="also write an int8 dynamically quantized model")
    p.add_argument("--threads", type=int, help="threads for the PyTorch and ONNX Runtime timings")
    p.set_defaults(handler=cmd_onnx)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def cmd_export(args: argparse.Namespace) -> int:
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


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from sparsebert.runtime.bench import bench_model, format_table, plot_sweep, random_pruned_model, results_json

    timing = {"warmup": args.warmup, "reps": args.reps, "budget_s": args.budget}
    common = {"mode": args.mode, "backend": args.backend, "max_density": args.max_density, **timing}
    torch.set_num_threads(args.threads)
    results = []
    if args.model:
        from sparsebert.export import load

        model = load(args.model)
        results += bench_model(model, args.batch_sizes, args.seq_len, args.threads, Path(args.model).name, **common)
        print(format_table(results), flush=True)
    else:
        for s in args.sparsity:
            model = random_pruned_model(args.arch, s)
            results += bench_model(model, args.batch_sizes, args.seq_len, args.threads, args.arch, **common)
            print(format_table(results[-len(args.batch_sizes) :]), flush=True)
            del model
        if len(args.sparsity) > 1:
            print("\nall results:\n" + format_table(results))
    kernels = sorted({r.kernels for r in results})
    print("kernels: " + "; ".join(kernels))
    if args.json:
        Path(args.json).write_text(json.dumps(results_json(results), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_onnx(args: argparse.Namespace) -> int:
    from sparsebert.runtime.onnx_export import export_onnx

    report = export_onnx(args.model, args.output, seq_len=args.seq_len, quantize=args.quantize, threads=args.threads)
    for key, value in report.items():
        print(f"{key:<28} {value}")
    if report.get("max_abs_diff", 1.0) > report.get("tolerance", 0.0):
        raise SparseBertError("ONNX outputs differ from PyTorch beyond the tolerance")
    return 0
