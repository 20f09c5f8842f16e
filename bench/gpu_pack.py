"""The folder that travels with the repository to a lent GPU machine, and the campaign's summaries.

The GPU machine reaches no network and takes at most 64 MiB of files, so everything the campaign
needs goes into one git-ignored folder (default ``gpu_pack/``, under 60 MiB):

  minilm-l6/   the packaged MiniLM-L6 with its weights in fp16 (45 MB instead of 91 MB; ``unpack``
               restores fp32 there, so the runs start from the pre-trained weights rounded to fp16,
               a relative change of at most 2^-11 per weight)
  data/        MRPC, SST-2 (GLUE folders from ../shared) and the embedded movie-rating task

    python bench/gpu_pack.py pack gpu_pack                 # here, before the device call
    python bench/gpu_pack.py unpack gpu_pack /tmp/minilm   # there: fp32 model folder
    python bench/gpu_pack.py summarize RUNS OUT/results.json
    python bench/gpu_pack.py summarize OLD/results.json NEW/results.json --run NAME=DIR   # refresh, add runs

``summarize`` reads every run folder's ``log.jsonl`` (dev metrics every ``--eval-every`` steps) and
``metrics.json``, so a campaign cut short still reports every point it reached.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sparsebert.io import atomic_write_json
from sparsebert.options import saved_options
from sparsebert.report import dev_curves

LIMIT_MB = 60
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
STUDENT_SHARE = 3.5  # see plan_steps: measured on the first H100 campaign (BENCHMARKS.md)
GLUE = {"MRPC": ("train.tsv", "dev.tsv"), "SST-2": ("train.tsv", "dev.tsv")}
SQUAD = ("train-articles-00-35.json", "dev-articles-36-41.json")  # SQuAD v1.1 split by article (4.2 MB)


def pack(dest: Path, shared: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from sparsebert.packaged import minilm_l6_path, packaged_task_dir

    if dest.exists():
        shutil.rmtree(dest)
    model = dest / "minilm-l6"
    model.mkdir(parents=True)
    source = minilm_l6_path()
    for name in MODEL_FILES:
        shutil.copy(source / name, model / name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}, model / "fp16.st")
    for task, files in GLUE.items():
        (dest / "data" / task).mkdir(parents=True)
        for name in files:
            shutil.copy(shared / "data" / "glue" / task / name, dest / "data" / task / name)
    shutil.copytree(packaged_task_dir("movie-rating"), dest / "data" / "movie-rating")
    (dest / "data" / "squad").mkdir()
    for name in SQUAD:
        shutil.copy(shared / "data" / "squad" / name, dest / "data" / "squad" / name)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20
    print(f"{dest}: {size:.1f} MiB")
    if size > LIMIT_MB:
        sys.exit(f"{dest} is {size:.1f} MiB, over the {LIMIT_MB} MiB that may travel")


def unpack(pack_dir: Path, dest: Path) -> None:
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy(pack_dir / "minilm-l6" / name, dest / name)
    weights = load_file(pack_dir / "minilm-l6" / "fp16.st")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model.safetensors")


def _read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return records


def summarize_run(folder: Path) -> dict:
    """One run's curve: dev metrics at every evaluation, the last step logged, steps per second.

    ``source`` (the run folder, links resolved) and ``options`` (its ``config.yaml``) say where each
    figure came from and with which recipe, so a table built from a folder of links can be traced back.
    Each point of a curve carries the target sparsity of the pruning schedule at its step, where logged.
    """
    log = _read_log(folder / "log.jsonl") if (folder / "log.jsonl").exists() else []
    start = next((r for r in log if r.get("event") == "start"), {})
    steps = [r for r in log if "loss" in r and "step" in r]
    run = {
        "source": str(folder.resolve()),
        "options": saved_options(folder),
        "total_steps": start.get("total_steps"),
        "mixed_precision": start.get("mixed_precision"),
        "last_step": steps[-1]["step"] if steps else 0,
        "finished": (folder / "metrics.json").exists(),
    }
    target = {r["step"]: r["target_sparsity"] for r in steps if "target_sparsity" in r}
    for kind, curve in dev_curves(log).items():  # "curve": the last weights; "curve_average": their mean
        run["curve" if kind == "last" else "curve_average"] = [
            {"step": step, **m, **_target_at(target, step)} for step, m in curve
        ]
    if len(steps) > 1:
        first, last = steps[0], steps[-1]
        run["steps_per_second"] = round((last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9), 2)
    if run["finished"]:
        run["final"] = json.loads((folder / "metrics.json").read_text())["metrics"]
    if (folder / "sparsity.json").exists():
        run["sparsity"] = json.loads((folder / "sparsity.json").read_text())["overall"]
    return run


def _target_at(target: dict[int, float], step: int) -> dict[str, float]:
    """The schedule's target sparsity at ``step``: that of the last training record logged at or before it."""
    logged = [s for s in target if s <= step]
    return {"target_sparsity": round(target[max(logged)], 4)} if logged else {}


def _sources(runs: Path) -> tuple[dict[str, Path], dict[str, dict], dict[str, dict]]:
    """The run folders to read by name, the teachers chosen, and rows to keep as recorded.

    ``runs`` is a folder of run folders (a campaign's), or a ``results.json`` written earlier: then each of
    its rows is read again from the folder it names (``source``), and a row whose folder is gone (another
    machine) is kept as recorded, so a committed file grows by new runs without a folder of links.
    """
    if runs.is_dir():
        folders = {p.name: p for p in sorted(runs.iterdir()) if (p / "log.jsonl").exists()}
        teachers = {
            c.stem.removeprefix("teachers-"): json.loads(c.read_text()) for c in sorted(runs.glob("teachers-*.json"))
        }
        return folders, teachers, {}
    earlier = json.loads(runs.read_text())
    folders, kept = {}, {}
    for name, run in earlier["runs"].items():
        if run.get("source") and (Path(run["source"]) / "log.jsonl").exists():
            folders[name] = Path(run["source"])
        else:
            print(
                f"warning: {name}: folder {run.get('source')} not found; its row is kept as recorded", file=sys.stderr
            )
            kept[name] = run
    return folders, earlier.get("teachers", {}), kept


def summarize(runs: Path, out: Path, extra: dict[str, Path] | None = None) -> dict:
    """Every run of ``runs`` (see ``_sources``) and of ``extra`` (name: folder; replaces a run of that name)
    summarized into ``out``, runs by name in order."""
    folders, teachers, kept = _sources(runs)
    folders.update(extra or {})
    rows = {**kept, **{name: summarize_run(folder) for name, folder in folders.items()}}
    result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": dict(sorted(rows.items()))}
    if teachers:
        result["teachers"] = teachers
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return result


def choose_teacher(runs: Path, prefix: str, metric: str) -> str:
    """The finished teacher run named ``prefix*`` with the best final dev ``metric``.

    The choice is recorded in ``teachers-PREFIX.json`` (one file per task: the tasks' chains run side by side).
    """
    scored = []
    for folder in sorted(runs.glob(prefix + "*")):
        if (folder / "metrics.json").exists():
            scored.append((json.loads((folder / "metrics.json").read_text())["metrics"][metric], folder.name))
    if not scored:
        sys.exit(f"no finished teacher {prefix}* in {runs}")
    best = max(scored)
    record = {"chosen": best[1], metric: best[0], "candidates": {name: value for value, name in scored}}
    atomic_write_json(runs / f"teachers-{prefix}.json", record)
    return str(runs / best[1])


def plan_steps(teacher: Path, seconds: float, jobs: int, cap: int = 20_000) -> tuple[int, int]:
    """Student steps that fit in ``seconds`` for each of ``jobs`` students sharing the device.

    The speed comes from the teacher run's log (fine-tuning steps/s, measured while the teachers shared
    the device). The first H100 campaign measured 5 students side by side at 0.7-1.1x their teachers'
    speed with 8 teachers side by side, i.e. ``STUDENT_SHARE`` = 3.5 teacher-speeds shared among the
    student jobs at the least. A run planned to fit reaches its target sparsity (the cubic schedule ends
    at a fraction of the run) and decays its LR fully, which a run cut off mid-way does not.
    Returns (steps, eval_every): at least 1,000 steps, at most ``cap``, ten evaluations per run. Fewer
    than 1,000 fitting is said on stderr: a 235-s call on the H100 planned 1,000 and was cut at
    ~700, before the LR had decayed (its MRPC students took their first step ~65 s after their
    teacher's last: loading and augmenting the data).
    """
    speed = summarize_run(teacher).get("steps_per_second")
    if not speed:
        sys.exit(f"{teacher}: no measured speed in its log.jsonl")
    fits = int(speed * STUDENT_SHARE / jobs * seconds * 0.9)
    if fits < 1000:
        print(
            f"warning: only ~{fits} steps fit in {seconds:.0f} s for {jobs} students; planning 1,000, "
            "which the budget will cut before the end",
            file=sys.stderr,
        )
    steps = min(cap, max(1000, fits)) // 500 * 500
    return steps, max(100, steps // 10 // 100 * 100)


def _named_run(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not (name and sep and folder):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pack")
    s.add_argument("dest", type=Path)
    s.add_argument("--shared", type=Path, default=Path("../shared"))
    s = sub.add_parser("unpack")
    s.add_argument("pack_dir", type=Path)
    s.add_argument("dest", type=Path)
    s = sub.add_parser("summarize", help="RUNS: a folder of run folders, or an earlier results.json to refresh")
    s.add_argument("runs", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument(
        "--run", action="append", default=[], type=_named_run, metavar="NAME=DIR", help="add (or replace) one run"
    )
    s.add_argument("--print", action="store_true", help="also print one progress line per run")
    s = sub.add_parser("choose-teacher")
    s.add_argument("runs", type=Path)
    s.add_argument("prefix")
    s.add_argument("metric")
    s = sub.add_parser("plan-steps", help="print --max-steps/--eval-every for a student that fits in SECONDS")
    s.add_argument("teacher", type=Path)
    s.add_argument("seconds", type=float)
    s.add_argument("--jobs", type=int, required=True, help="student jobs sharing the device")
    args = p.parse_args()
    if args.command == "pack":
        pack(args.dest, args.shared)
    elif args.command == "unpack":
        unpack(args.pack_dir, args.dest)
    elif args.command == "choose-teacher":
        print(choose_teacher(args.runs, args.prefix, args.metric))
    elif args.command == "plan-steps":
        steps, every = plan_steps(args.teacher, args.seconds, args.jobs)
        print(f"--max-steps {steps} --eval-every {every}")
    else:
        result = summarize(args.runs, args.out, dict(args.run))
        for name, run in result["runs"].items() if args.print else ():
            last = run["curve"][-1] if run["curve"] else {}
            speed = run.get("steps_per_second", "?")
            print(f"  {name}: step {run['last_step']}/{run['total_steps']}, {speed} steps/s, last eval {last}")


if __name__ == "__main__":
    main()
