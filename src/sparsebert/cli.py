"""``sparsebert`` command line: argparse over the Python API (see sparsebert.api).

Every training option may also come from a YAML recipe (``--config recipe.yaml``); flags override it.
User errors print one line and exit with status 2; an interrupted run says how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sparsebert.config import STRATEGIES
from sparsebert.errors import SparseBertError
from sparsebert.runtime.commands import register_commands

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _data_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    g = p.add_argument_group("data (one source)")
    g.add_argument(
        "--task",
        help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), movie-sentiment, movie-rating, "
        "or classification/regression for your own files",
    )
    g.add_argument("--data-dir", help="folder in the classic GLUE layout (train.tsv, dev.tsv)")
    g.add_argument("--dataset", help="hub dataset name, e.g. glue (needs network)")
    if train:
        g.add_argument("--train-file", help="your own CSV/TSV/JSONL training file")
    g.add_argument("--dev-file", help="your own CSV/TSV/JSONL dev file")
    g.add_argument("--text-columns", help="comma-separated text column(s) of your files")
    g.add_argument("--label-column", help="label column of your files")
    g.add_argument("--max-eval-examples", type=int, help="use only the first N dev examples")
    if train:
        g.add_argument("--max-train-examples", type=int, help="use only the first N training examples")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe; flags override it")
    p.add_argument("--output-dir", help="where the model, metrics.json, config.yaml and log.jsonl go")
    _data_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float)
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--lr-schedule", choices=["linear", "constant"])
    g.add_argument("--max-seq-length", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--eval-every", type=int, help="dev evaluation every N steps (default 200; 0: at the end only)")
    g.add_argument("--save-every", type=int, help="write a resumable checkpoint every N steps")
    g.add_argument("--log-every", type=int)
    g.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "bf16", "fp16"],
        help="auto (default): bf16 where the hardware runs it natively, fp32 (no) elsewhere",
    )
    g.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="training batches of similar length, less padding (default: on)",
    )
    g.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty output dir")
    g.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")


def _prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning and distillation")
    g.add_argument("--sparsity", type=float, help="target sparsity of the pruned layers (0.95 = 20x)")
    g.add_argument("--strategy", choices=list(STRATEGIES), help="sparsebert (default) or a baseline order of work")
    g.add_argument("--prune-start", type=float, help="first pruning step, or fraction of the run if <= 1")
    g.add_argument("--prune-end", type=float, help="step where the target is reached, or fraction if <= 1")
    g.add_argument("--prune-updates", type=int, help="number of mask updates in the window (paper: 100)")
    g.add_argument("--prune-scope", choices=["per_matrix", "global"])
    g.add_argument("--temperature", type=float)
    g.add_argument("--loss-weights", help="attention,hidden,prediction (default 0.1,1,5; the paper: 1,1,1)")
    g.add_argument("--regression-target", choices=["teacher", "label", "both"])
    g.add_argument("--student-head", choices=["teacher", "fresh"], help="start the task head from the teacher's")
    g.add_argument("--head-lr", type=float, help="learning rate of the task head")
    g.add_argument(
        "--augment", type=int, help="augmented copies of each training example, labelled by the teacher (default 0)"
    )


def _teacher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher (fine-tuned first, once)")
    g.add_argument("--teacher-epochs", type=float)
    g.add_argument("--teacher-max-steps", type=int)
    g.add_argument("--teacher-lr", type=float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsebert", description="Knowledge-aware sparse pruning of BERT-family encoders (SparseBERT)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="less logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="fine-tune a model on a task (the teacher)")
    p.add_argument("--model", help="minilm-l6, a local folder, or a hub id")
    _train_args(p)

    p = sub.add_parser("prune", help="prune a pre-trained student while distilling from a fine-tuned teacher")
    p.add_argument("--teacher", help="fine-tuned teacher folder (from `sparsebert finetune`)")
    p.add_argument("--student", help="pre-trained student (usually the teacher's base model)")
    _train_args(p)
    _prune_args(p)

    p = sub.add_parser("compress", help="the whole job: fine-tune the teacher, prune the student, report")
    p.add_argument("--model", help="pre-trained model (teacher and student start from it)")
    _train_args(p)
    _prune_args(p)
    _teacher_args(p)

    p = sub.add_parser("compare", help="every strategy at every sparsity, one teacher: results, CSV, plots")
    p.add_argument("--model", help="pre-trained model (teacher and students start from it)")
    _train_args(p)
    _prune_args(p)
    _teacher_args(p)
    p.add_argument("--sparsities", help="comma-separated, e.g. 0.5,0.7,0.8,0.9,0.95,0.97")
    p.add_argument("--strategies", help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument(
        "--dense-student", help="pre-trained model distill-dense starts from, e.g. minilm-l3 (default: --model)"
    )

    p = sub.add_parser("evaluate", help="dev metrics of a saved model")
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--model", help="model folder or name")
    _data_args(p, train=False)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--mixed-precision", choices=["no", "auto", "bf16", "fp16"], help="default no: fp32, exact")
    p.add_argument("--output", help="write metrics.json here")

    sub.add_parser("fetch-defaults", help="build the embedded data and minilm-l3 (make install runs this)")
    register_commands(sub)  # export, bench, onnx: the compressed format and the sparse runtime
    return parser


def _options(args: argparse.Namespace) -> dict:
    skip = {"command", "config", "quiet"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quiet:  # transformers' load reports (e.g. the head a student gets from its teacher) and bars
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    from sparsebert import api
    from sparsebert.config import (
        CompareConfig,
        CompressConfig,
        EvaluateConfig,
        FinetuneConfig,
        PruneConfig,
        build_config,
    )
    from sparsebert.io import check_not_an_input

    if getattr(args, "handler", None) is not None:
        return args.handler(args) or 0
    if args.command == "fetch-defaults":
        from sparsebert.packaged import PACKAGED_TASKS, minilm_l3_path, minilm_l6_path, packaged_task_dir

        print(f"model minilm-l6: {minilm_l6_path()}")
        print(f"model minilm-l3: {minilm_l3_path()}")
        for task in PACKAGED_TASKS:
            print(f"task {task}: {packaged_task_dir(task)}")
        return 0
    if args.command == "evaluate":
        record = api.evaluate(build_config(EvaluateConfig, args.config, **_options(args)))
        print(format_metrics(record))
        return 0
    cls = {"finetune": FinetuneConfig, "prune": PruneConfig, "compress": CompressConfig, "compare": CompareConfig}
    config = build_config(cls[args.command], args.config, **_options(args))
    if config.output_dir:  # the recipe is an input too: never inside the folder a run may empty
        check_not_an_input(config.output_dir, [args.config])
    if args.command == "compress":
        api.compress(config)
        return 0
    if args.command == "compare":
        from sparsebert.compare import compare

        results = compare(config)
        for r in results["runs"]:
            print(
                f"{r['strategy']:<22} {100 * r['sparsity']:5.1f}%  nonzero {r['nonzero_params']:>10,}  "
                + "  ".join(f"{k} {_percent(v)}" for k, v in r["metrics"].items())
            )
        print(f"results in {config.output_dir}/results.json, results.csv, metric_vs_sparsity.png, train_loss.png")
        return 0
    result = getattr(api, args.command)(config)
    print(format_metrics(json.loads((result.output_dir / "metrics.json").read_text())))
    if result.sparsity is not None:
        print(f"sparsity of the pruned layers: {100 * result.sparsity['overall']:.2f}%")
    print(f"saved to {result.output_dir} in {result.seconds:.0f} s")
    return 0


def _percent(value: float | None) -> str:
    """A metric as a percentage; ``None`` is what JSON holds for an undefined one (NaN)."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_metrics(record: dict) -> str:
    rows = [f"{name:<22} {_percent(value):>8}" for name, value in record["metrics"].items()]
    head = f"{record['task']} (dev, {record.get('num_examples', '?')} examples)"
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except SparseBertError as exc:
        print(f"sparsebert: error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("sparsebert: interrupted; a checkpoint was saved, continue with --resume", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
