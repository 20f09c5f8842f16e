"""What happened in a compress run: teacher vs pruned metrics, sparsity, parameters, FLOPs, time, plots."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from sparsebert.io import JsonlLog, atomic_write_json, atomic_write_text, read_json
from sparsebert.models import head_kind


def flops_per_sequence(config, linear_nonzeros: int, seq_len: int) -> int:
    """Multiply-adds x 2 for one sequence: encoder linears (their nonzeros), attention matmuls, head (a
    classifier on the first token, or extractive QA's span head on every token).

    Embedding lookups, softmax and LayerNorm are left out (they are a few percent at these sizes).
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    linear = 2 * linear_nonzeros * seq_len
    attention = layers * 2 * 2 * seq_len * seq_len * hidden  # Q K^T and A V
    if head_kind(config.architectures) == "QuestionAnswering":
        head = 2 * hidden * 2 * seq_len  # start and end logits at every token, no pooler
    else:
        head = 2 * hidden * hidden + 2 * hidden * config.num_labels  # pooler + classifier, first token only
    return linear + attention + head


def _wall_seconds(run_dir: Path) -> float | None:
    for record in reversed(JsonlLog(run_dir / "log.jsonl").read()):
        if record.get("event") == "saved":
            return record["wall_seconds"]
    return None


def pyplot():
    """matplotlib's pyplot on the file-only backend (runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dev_curves(log: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """[(step, dev metrics)] of the last weights at every evaluation ("last") and, in a run that averaged
    its weights (``--average-weights``), of the average from where it began ("average"): the evaluation
    after the last weights' own (``eval_last_weights``) is the average's, the saved model."""
    curves: dict[str, list[tuple[int, dict]]] = {"last": [], "average": []}
    final_is_average = False
    for r in log:
        if r.get("event") == "eval_last_weights":
            curves["last"].append((r["step"], r["metrics"]))
            final_is_average = True
        elif r.get("event") == "eval":
            curves["average" if final_is_average else "last"].append((r["step"], r["metrics"]))
            if "metrics_average" in r:
                curves["average"].append((r["step"], r["metrics_average"]))
    return curves if curves["average"] else {"last": curves["last"]}


def plot_run(run_dir: Path, sparsity: dict | None = None) -> list[Path]:
    """PNG plots of a run: training loss and dev metrics (with the target sparsity) vs step; sparsity per layer."""
    plt = pyplot()

    log = JsonlLog(run_dir / "log.jsonl").read()
    records = [r for r in log if "loss" in r and "step" in r]
    evals = [r for r in log if r.get("event") == "eval"]
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=80)
        plt.close(fig)
        made.append(run_dir / name)

    def sparsity_axis(ax) -> None:
        if any("target_sparsity" in r for r in records):
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in records], [r.get("target_sparsity", 0) for r in records], "r--")
            ax2.set_ylabel("target sparsity", color="r")

    if records:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        sparsity_axis(ax)
        ax.set_title(run_dir.name)
        save(fig, "loss.png")
    if len(evals) > 1:  # dev metrics during training: where pruning hurt and how far the run recovered
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for kind, curve in dev_curves(log).items():
            style, label = ("o-", "") if kind == "last" else ("s--", " (weights averaged)")
            for name in curve[-1][1]:
                ax.plot([s for s, _ in curve], [100 * m[name] for _, m in curve], style, label=name + label)
        ax.set_xlabel("step")
        ax.set_ylabel("dev metric (%)")
        ax.legend(fontsize=8)
        sparsity_axis(ax)
        ax.set_title(run_dir.name)
        save(fig, "dev.png")
    if sparsity:
        fig, ax = plt.subplots(figsize=(6, 3))
        layers = sorted(sparsity["layers"], key=int)
        ax.bar([int(k) for k in layers], [sparsity["layers"][k] for k in layers])
        ax.set_ylim(0, 1)
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("sparsity")
        save(fig, "sparsity.png")
    return made


def write_report(out: Path, config) -> dict:
    """Gather the teacher and student results into report.json / report.md and print the table."""
    redo = "delete that stage's folder and continue with --resume (it runs again), or start over with --overwrite"
    teacher = read_json(out / "teacher" / "metrics.json", ("task", "metrics"), redo)
    student = read_json(out / "student" / "metrics.json", ("metrics",), redo)
    sparsity = read_json(out / "student" / "sparsity.json", ("overall", "model", "nonzero"), redo)
    model_config = AutoConfig.from_pretrained(out / "student")
    nz = sparsity["nonzero"]
    seq = config.data.max_seq_length
    report = {
        "task": teacher["task"],
        "teacher": teacher["metrics"],
        "student": student["metrics"],
        "sparsity": {"pruned_layers": sparsity["overall"], "model": sparsity["model"]},
        "nonzero_params": nz,
        "flops_per_sequence": {
            "seq_len": seq,
            "dense": flops_per_sequence(model_config, nz["pruned_layers_total"], seq),
            "sparse": flops_per_sequence(model_config, nz["pruned_layers"], seq),
        },
        "wall_seconds": {"teacher": _wall_seconds(out / "teacher"), "student": _wall_seconds(out / "student")},
    }
    plots = plot_run(out / "teacher") + plot_run(out / "student", sparsity)
    report["plots"] = [str(p.relative_to(out)) for p in plots]
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", format_report(report))
    return report


def format_report(r: dict) -> str:
    names = list(r["teacher"])
    lines = [
        f"# sparsebert compress report: {r['task']}",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for who in ("teacher", "student"):
        lines.append(f"| {who} | " + " | ".join(f"{100 * r[who][n]:.2f}" for n in names) + " |")
    nz, fl = r["nonzero_params"], r["flops_per_sequence"]
    lines += [
        "",
        f"- sparsity of the pruned layers: {100 * r['sparsity']['pruned_layers']:.2f}% "
        f"(whole model: {100 * r['sparsity']['model']:.2f}% zeros)",
        f"- nonzero parameters: pruned layers {nz['pruned_layers']:,} of {nz['pruned_layers_total']:,} "
        f"({nz['pruned_layers_total'] / max(nz['pruned_layers'], 1):.1f}x fewer); "
        f"whole model {nz['model']:,} of {nz['model_total']:,}",
        f"- FLOPs per sequence of {fl['seq_len']} tokens: dense {fl['dense'] / 1e9:.2f} G, "
        f"sparse {fl['sparse'] / 1e9:.2f} G ({fl['dense'] / fl['sparse']:.1f}x fewer)",
        f"- wall time: teacher {r['wall_seconds']['teacher']} s, student {r['wall_seconds']['student']} s",
        "",
        *(f"![{p}]({p})" for p in r.get("plots", [])),
    ]
    return "\n".join(lines)
