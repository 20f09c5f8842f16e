"""The budget curve: one plot per task, dev metric vs training steps, from campaign results.

Reads one or more ``results.json`` written by ``bench/gpu_pack.py summarize`` (the GPU campaign, or CPU
runs summarized the same way) and draws every student run of a task, its chosen teacher and the majority
class as horizontal lines (with the target: the teacher less 1.5 points, or 0.02 Pearson), and prints each
group of seeds' final dev metric, mean ± standard deviation against the teacher (BENCHMARKS.md's tables of seeds).

    python bench/budget_plot.py bench/results/budget-gpu-h100/results.json --out bench/results/budget-gpu-h100
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from sparsebert.report import pyplot

# task: (name prefix in the campaign, metric plotted, majority-class score on dev or None)
TASKS = {
    "mrpc": ("mrpc", "accuracy", 279 / 408),
    "sst2": ("sst2", "accuracy", 444 / 872),
    "movie-rating": ("rating", "pearson", None),
    "movie-sentiment": ("sent", "accuracy", 509 / 1007),
}


def _runs(paths: list[Path]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every run by name (a later file's run of the same name wins) and the teachers chosen."""
    runs: dict[str, dict] = {}
    teachers: dict[str, dict] = {}
    for path in paths:
        result = json.loads(path.read_text())
        runs.update(result["runs"])
        teachers.update(result.get("teachers", {}))
    return runs, teachers


def split_seed(name: str) -> tuple[str, int | None]:
    """A run's group and seed: ``mrpc-600-def-s42`` -> (``mrpc-600-def``, 42); a name without ``-sNN``: (name, None)."""
    match = re.search(r"-s(\d+)$", name)
    return (name[: match.start()], int(match.group(1))) if match else (name, None)


def seed_groups(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """Runs that differ only in their seed (names ending ``-sNN``) under one name, in seed order."""
    groups: dict[str, list[dict]] = {}
    for name, run in sorted(runs.items()):
        groups.setdefault(split_seed(name)[0], []).append(run)
    return groups


def mean_curve(group: list[dict], metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every run of the group evaluated at, with the mean, lowest and highest dev metric there."""
    by_step = [{p["step"]: p[metric] for p in run["curve"]} for run in group]
    steps = sorted(set.intersection(*(set(curve) for curve in by_step)))
    values = [[curve[step] for curve in by_step] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def summary(task: str, runs: dict[str, dict], teachers: dict[str, dict]) -> list[str]:
    """One line per group of seeds: the last weights' final dev metric and the saved model's (the average of
    the recovery under ``--average-weights``), each as its seeds' values = mean ± sd, and against the teacher."""
    prefix, metric, _ = TASKS[task]
    teacher = teachers.get(f"teacher-{prefix}", {}).get(metric)
    lines = []
    for name, group in seed_groups(_students(runs, prefix)).items():
        last = [r["curve"][-1][metric] for r in group if r.get("curve")]
        saved = [r["final"][metric] for r in group if metric in r.get("final", {})]
        parts = []
        for label, values in (("last", last), ("saved", saved)):
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                mean = statistics.fmean(values)
                gap = f" ({mean - teacher:+.4f} vs teacher)" if teacher is not None else ""
                parts.append(f"{label} {', '.join(f'{v:.4f}' for v in values)} = {mean:.4f} ± {sd:.4f}{gap}")
        total, ends = group[0]["total_steps"], [r["curve"][-1]["step"] for r in group if r.get("curve")]
        cut = f", unfinished: last evaluated at step {', '.join(map(str, ends))}" if min(ends or [0]) < total else ""
        lines.append(f"{task} {name} ({total} steps{cut}): " + "; ".join(parts))
    return lines


def paired(task: str, runs: dict[str, dict], reference: str) -> list[str]:
    """Each group against the group named ``reference``, seed by seed (last weights' final dev metric):
    the differences on the seeds both ran, and their mean ± sd. Pairing removes the seed's own luck (the
    shuffling, the student's head), which on MRPC's 408 pairs is as large as the differences sought."""
    prefix, metric, _ = TASKS[task]
    by_seed: dict[str, dict[int, float]] = {}
    for name, run in _students(runs, prefix).items():
        group, seed = split_seed(name)
        if seed is not None and run.get("curve"):
            by_seed.setdefault(group, {})[seed] = run["curve"][-1][metric]
    if reference not in by_seed:
        return []
    lines = []
    for name, values in by_seed.items():
        seeds = sorted(set(values) & set(by_seed[reference]))
        if name == reference or not seeds:
            continue
        diffs = [values[s] - by_seed[reference][s] for s in seeds]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        each = ", ".join(f"s{s} {d:+.4f}" for s, d in zip(seeds, diffs, strict=True))
        mean = statistics.fmean(diffs)
        lines.append(f"{task} {name} vs {reference}, paired by seed: {each} = {mean:+.4f} ± {sd:.4f}")
    return lines


def curves(task: str, runs: dict[str, dict]) -> list[str]:
    """BENCHMARKS' "dev metric every N steps" rows: each run's curve (percent, or the metric itself for
    Pearson), then its group's mean curve over the steps every seed evaluated at, and the pruning
    schedule's target sparsity at those steps (``summarize`` records it with each point)."""
    prefix, metric, _ = TASKS[task]
    scale, digits = (1, 3) if metric == "pearson" else (100, 2)

    def row(values: list[float]) -> str:
        return " ".join(f"{v * scale:.{digits}f}" for v in values)

    lines = []
    students = _students(runs, prefix)
    for name, group in seed_groups(students).items():
        for member in (n for n in sorted(students) if split_seed(n)[0] == name and students[n].get("curve")):
            curve = students[member]["curve"]
            steps = f"steps {curve[0]['step']}…{curve[-1]['step']}"
            lines.append(f"{task} {member} {steps}: {row([point[metric] for point in curve])}")
        if len(group) > 1:
            _, mean, _, _ = mean_curve(group, metric)
            lines.append(f"{task} {name} mean: {row(mean)}")
        target = [p.get("target_sparsity") for p in group[0].get("curve", [])]
        if target and None not in target:  # one schedule for the group: its seeds share the options
            lines.append(f"{task} {name} target sparsity %: " + " ".join(f"{100 * t:.1f}" for t in target))
    return lines


def _students(runs: dict[str, dict], prefix: str) -> dict[str, dict]:
    return {n: r for n, r in runs.items() if not n.startswith("teacher") and f"-{prefix}-" in f"-{n}-"}


def plot_task(task: str, runs: dict[str, dict], teachers: dict[str, dict], out: Path) -> Path | None:
    """Every student group's mean curve, its seeds' range shaded; the teacher, target and majority lines."""
    prefix, metric, majority = TASKS[task]
    students = _students(runs, prefix)
    if not students:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, group in seed_groups(students).items():
        steps, mean, low, high = mean_curve(group, metric)
        seeds = f", mean of {len(group)} seeds" if len(group) > 1 else ""
        sparsity = f"{group[0]['sparsity']:.0%}" if "sparsity" in group[0] else "unfinished"  # written at the end
        label = f"{name} ({group[0]['total_steps']} steps, {sparsity}{seeds})"
        (line,) = ax.plot(steps, mean, marker=".", label=label)
        if len(group) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    chosen = teachers.get(f"teacher-{prefix}")
    if chosen:
        ax.axhline(chosen[metric], color="black", linestyle="--", label=f"teacher {chosen[metric]:.3f}")
        ax.axhline(chosen[metric] - (0.02 if metric == "pearson" else 0.015), color="grey", linestyle=":",
                   label="target (teacher - 1.5 points / 0.02)")  # fmt: skip
    if majority is not None:
        ax.axhline(majority, color="red", linestyle="-.", label=f"majority class {majority:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(f"{task}: SparseBERT students, dev {metric} vs steps")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / f"{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--paired-with", metavar="GROUP", help="also print each group's per-seed differences from GROUP")
    p.add_argument("--curves", action="store_true", help="also print each run's dev curve and each group's mean")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs, teachers = _runs(args.results)
    for task in TASKS:
        path = plot_task(task, runs, teachers, args.out)
        if path:
            print(path, *summary(task, runs, teachers), sep="\n")
        for line in paired(task, runs, args.paired_with) if args.paired_with else []:
            print(line)
        for line in curves(task, runs) if args.curves else []:
            print(line)


if __name__ == "__main__":
    main()
