"""``sparsebert compare``: the paper's knowledge analysis on the user's own task.

Every strategy of ``strategies.TABLE`` (SparseBERT, the paper's other orders, a small dense student) at
every sparsity, from one shared teacher. With ``--resume`` finished runs are skipped and an interrupted
one continues, so a long sweep can be stopped and continued. Writes results.json, results.csv and two
plots: dev metric vs sparsity per strategy (the paper's Figure 4) and training loss on the labels vs
step (its Figure 5, "fitting ability"; for distilling strategies the student's label cross-entropy is
logged alongside their loss).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import time
from pathlib import Path

from accelerate import PartialState

from sparsebert.api import RunResult, finetune, prune
from sparsebert.config import CompareConfig
from sparsebert.io import JsonlLog, atomic_write_json, read_json
from sparsebert.pipeline import run_stage, teacher_first
from sparsebert.report import pyplot
from sparsebert.strategies import TABLE
from sparsebert.tasks import get_task


def _loss_curve(run_dir: Path) -> list[list[float]]:
    """[step, training loss on the labels] from a run's log."""
    curve = []
    for r in JsonlLog(run_dir / "log.jsonl").read():
        if "step" in r and "loss" in r:
            curve.append([r["step"], r.get("loss_label_ce", r["loss"])])
    return curve


REDO = "delete that run's folder and continue with --resume (it runs again), or start over with --overwrite"


def collect(out: Path, config: CompareConfig) -> dict:
    runs = []
    for strategy in config.compare.strategies:
        for sparsity in config.compare.sparsities:
            run_dir = out / f"{strategy}-{sparsity:g}"
            if not (run_dir / "metrics.json").exists():
                continue
            nonzero = read_json(run_dir / "sparsity.json", ("nonzero",), REDO)["nonzero"]
            runs.append(
                {
                    "strategy": strategy,
                    "sparsity": sparsity,
                    "nonzero_params": nonzero["pruned_layers"],
                    "metrics": read_json(run_dir / "metrics.json", ("metrics",), REDO)["metrics"],
                    "train_loss_curve": _loss_curve(run_dir),
                }
            )
    teacher = read_json(out / "teacher" / "metrics.json", ("metrics",), REDO)["metrics"]
    return {"task": get_task(config.data.task).name, "teacher": teacher, "runs": runs}


def write_csv(path: Path, results: dict) -> None:
    names = list(results["teacher"])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "sparsity", "nonzero_params", *names])
        writer.writerow(["teacher", 0.0, "", *(results["teacher"][n] for n in names)])
        for r in results["runs"]:
            writer.writerow([r["strategy"], r["sparsity"], r["nonzero_params"], *(r["metrics"].get(n) for n in names)])


def plot(out: Path, results: dict) -> None:
    plt = pyplot()

    strategies = list(dict.fromkeys(r["strategy"] for r in results["runs"]))
    colors = {strategy: f"C{i}" for i, strategy in enumerate(strategies)}  # the same in every panel
    metrics = list(results["teacher"])  # one panel each: MRPC's F1 alone hides an all-"paraphrase" model
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for strategy in strategies:
            rows = sorted((r["sparsity"], r["metrics"][metric]) for r in results["runs"] if r["strategy"] == strategy)
            x, y = [100 * s for s, _ in rows], [float("nan") if v is None else 100 * v for _, v in rows]
            ax.plot(x, y, "o-", label=strategy, color=colors[strategy])
        if results["teacher"][metric] is not None:
            ax.axhline(100 * results["teacher"][metric], color="gray", ls="--", label="teacher (dense)")
        ax.set_xlabel("sparsity of the encoder's linear layers (%)")
        ax.set_ylabel(f"dev {metric} (%)")
        ax.set_title(f"{results['task']}: {metric} vs sparsity")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_sparsity.png", dpi=80)
    plt.close(fig)

    sparsities = sorted({r["sparsity"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(3.2 * len(sparsities), 3), squeeze=False, sharey=True)
    for ax, sparsity in zip(axes[0], sparsities, strict=True):
        for strategy in strategies:
            for r in results["runs"]:
                if r["strategy"] == strategy and r["sparsity"] == sparsity and r["train_loss_curve"]:
                    steps, losses = zip(*r["train_loss_curve"], strict=True)
                    ax.plot(steps, losses, label=strategy, color=colors[strategy])
        ax.set_title(f"sparsity {100 * sparsity:g}%")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss on labels")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}  # every strategy, whichever panel has it
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "train_loss.png", dpi=80)
    plt.close(fig)


def compare(config: CompareConfig) -> RunResult:
    """Run (or, with ``--resume``, continue) the sweep and write its results and plots (in ``details``)."""
    started = time.perf_counter()
    with teacher_first(config, finetune) as (out, template):
        for strategy in config.compare.strategies:
            for sparsity in config.compare.sparsities:
                dense_student = TABLE[strategy].student_from == "pretrained-cut" and config.compare.dense_student
                run_cfg = dataclasses.replace(
                    copy.deepcopy(template),
                    pruning=dataclasses.replace(template.pruning, strategy=strategy, sparsity=sparsity),
                    run=dataclasses.replace(template.run, output_dir=str(out / f"{strategy}-{sparsity:g}")),
                    models=dataclasses.replace(template.models, student=dense_student or template.models.student),
                )
                run_stage(run_cfg, prune)
        results = collect(out, config)
        if PartialState().is_main_process:
            atomic_write_json(out / "results.json", results)
            write_csv(out / "results.csv", results)
            plot(out, results)
    return RunResult(out, {}, time.perf_counter() - started, details=results)
