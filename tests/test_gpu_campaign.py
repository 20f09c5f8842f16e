"""bench/gpu_campaign.sh end to end at tiny size on the CPU, so the GPU run cannot rot before a GPU
is lent: the pack that travels (under 60 MiB, fp16 weights restored to fp32), both phases, results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import sentiment_rows, squad_articles, write_tsv
from safetensors.torch import load_file

from sparsebert.hardware import resolve_mixed_precision
from sparsebert.packaged import minilm_l6_path
from sparsebert.runtime.int8 import int8_available

ROOT = Path(__file__).resolve().parents[1]
MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def _fake_shared(root: Path) -> Path:
    """The two GLUE folders and the SQuAD files the pack copies, small: MRPC pairs, SST-2 sentences, questions."""
    for split, seed in (("train", 11), ("dev", 12)):
        rows = sentiment_rows(48, seed)
        pairs = [[label, i, i + 1, text, rows[(i + 1) % len(rows)][0]] for i, (text, label) in enumerate(rows)]
        (root / "data" / "glue" / "MRPC").mkdir(parents=True, exist_ok=True)
        (root / "data" / "glue" / "SST-2").mkdir(parents=True, exist_ok=True)
        write_tsv(root / "data" / "glue" / "MRPC" / f"{split}.tsv", MRPC_HEADER, pairs)
        write_tsv(root / "data" / "glue" / "SST-2" / f"{split}.tsv", ["sentence", "label"], [list(r) for r in rows])
    squad = root / "data" / "squad"
    squad.mkdir(parents=True)
    (squad / "train-articles-00-35.json").write_text(json.dumps(squad_articles(12, 21, two_golds=False)))
    (squad / "dev-articles-36-41.json").write_text(json.dumps(squad_articles(4, 22, two_golds=True)))
    return root


def test_campaign_runs_end_to_end_at_tiny_size(tmp_path):
    pack, runs, out = tmp_path / "pack", tmp_path / "runs", tmp_path / "out"
    shared = _fake_shared(tmp_path / "shared")
    packed = subprocess.run(
        [sys.executable, "bench/gpu_pack.py", "pack", pack, "--shared", shared],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert packed.returncode == 0, packed.stderr
    assert sum(f.stat().st_size for f in pack.rglob("*") if f.is_file()) < 60 * 2**20

    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SCALE": "tiny",
        "PACK": str(pack),
        "RUNS": str(runs),
        "OUT": str(out),
        "OMP_NUM_THREADS": "1",
        # The time budget stops every job when it runs out; this test is about running end to end, not
        # speed: on two cores shared with two training runs, the default 540 s stopped students unfinished.
        "BUDGET": "1800",
        "VARIANTS": "magnitude:--prune-criterion magnitude;taylor-block4:--prune-block 4",
        "TASKS": "mrpc sst2 rating squad",
    }
    done = subprocess.run(
        ["bash", "bench/gpu_campaign.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "campaign done" in done.stdout

    original = load_file(minilm_l6_path() / "model.safetensors")
    restored = load_file(runs / "minilm-l6" / "model.safetensors")
    for name, weight in original.items():  # fp16 on the way, fp32 again: within fp16's rounding
        assert restored[name].dtype == weight.dtype
        assert torch.allclose(restored[name].double(), weight.double(), rtol=2**-10, atol=1e-7), name

    result = json.loads((out / "results.json").read_text())
    students = {n: r for n, r in result["runs"].items() if n.startswith("student-")}
    assert len(result["runs"]) == 18 and len(students) == 8  # 10 teachers; 4 tasks x 2 variants x 1 seed
    assert all(r["finished"] for r in result["runs"].values())
    assert set(result["teachers"]) == {"teacher-mrpc", "teacher-sst2", "teacher-rating", "teacher-squad"}
    assert all(r["sparsity"] == pytest.approx(0.9, abs=1e-3) for r in students.values())
    variants = {"magnitude": ("magnitude", 1), "taylor-block4": ("taylor", 4)}
    for task in ("mrpc-aug", "sst2", "rating", "squad"):  # every task once per variant and seed
        for variant, (criterion, block) in variants.items():
            name = f"student-{task}-{variant}-s42"
            config = yaml.safe_load((runs / name / "config.yaml").read_text())
            assert result["runs"][name]["options"] == config  # each figure's recipe, in results.json
            assert result["runs"][name]["source"] == str((runs / name).resolve())
            assert (config["prune_criterion"], config["prune_block"], config["seed"]) == (criterion, block, 42)
            assert config["augment"] == (task == "mrpc-aug")
    if int8_available():  # the int8 engine's dev metrics on the 1x4 student, beside fp32
        accuracy = json.loads((out / "accuracy-student-mrpc-aug-taylor-block4-s42.json").read_text())
        assert {"fp32", "sparse", "sparse-int8"} <= set(accuracy["paths"])
        assert accuracy["sparse_kernels"]["int8"].count("cpp-int8") > 0
    for run in students.values():  # the last weights at every evaluation; their average from step 5 (0.9 x 6)
        assert [point["step"] for point in run["curve"]] == [3, 6]
        assert [point["step"] for point in run["curve_average"]] == [6]
        # the saved model is the average; each point carries the schedule's target sparsity at its step
        assert run["curve_average"][-1] == {"step": 6, **run["final"], "target_sparsity": 0.9}
        assert run["mixed_precision"] == resolve_mixed_precision("auto")


def test_students_are_planned_to_fit_the_time_left(tmp_path, capsys):
    """plan-steps: the teacher's measured speed shared among the student jobs, rounded down to 500 steps,
    never under 1,000 (said on stderr when fewer fit) nor over 20,000, ten evaluations per run."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_pack import STUDENT_SHARE, plan_steps

    records = [{"time": 100.0, "event": "start"}, {"time": 101.0, "step": 10, "loss": 1.0},
               {"time": 111.0, "step": 210, "loss": 1.0}]  # fmt: skip
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = int(20.0 * STUDENT_SHARE / 10 * 400 * 0.9) // 500 * 500  # 20 steps/s measured
    assert plan_steps(tmp_path, 400, jobs=10) == (expected, expected // 10 // 100 * 100)
    assert "warning" not in capsys.readouterr().err
    assert plan_steps(tmp_path, 1, jobs=10) == (1000, 100)
    assert "only ~6 steps fit" in capsys.readouterr().err
    assert plan_steps(tmp_path, 1e6, jobs=1) == (20_000, 2000)


def test_budget_plot_prints_each_group_of_seeds_against_its_teacher():
    """The tables of seeds in BENCHMARKS.md come from this: per group of seeds, the last weights' and the saved
    model's final dev metric, mean ± sd, and the gap to the chosen teacher."""
    sys.path.insert(0, str(ROOT / "bench"))
    from budget_plot import summary

    def student(last: float, saved: float | None, step: int = 300) -> dict:
        final = {"final": {"accuracy": saved}} if saved is not None else {}
        return {"total_steps": 300, "curve": [{"step": step, "accuracy": last}], **final}

    runs = {"student-sst2-s90-s42": student(0.86, 0.85), "student-sst2-s90-s43": student(0.88, 0.87),
            "student-sst2-cut-s42": student(0.8, None, step=200), "student-sst2-cut-s43": student(0.8, 0.8),
            "student-mrpc-aug-s90-s42": student(0.5, 0.5), "teacher-sst2-lr1e-4": student(0.9, 0.9)}  # fmt: skip
    teachers = {"teacher-sst2": {"chosen": "teacher-sst2-lr1e-4", "accuracy": 0.9}}
    assert summary("sst2", runs, teachers) == [
        "sst2 student-sst2-cut (300 steps, unfinished: last evaluated at step 200, 300): "
        "last 0.8000, 0.8000 = 0.8000 ± 0.0000 (-0.1000 vs teacher); "
        "saved 0.8000 = 0.8000 ± 0.0000 (-0.1000 vs teacher)",
        "sst2 student-sst2-s90 (300 steps): last 0.8600, 0.8800 = 0.8700 ± 0.0141 (-0.0300 vs teacher); "
        "saved 0.8500, 0.8700 = 0.8600 ± 0.0141 (-0.0400 vs teacher)",
    ]


def test_budget_plot_pairs_each_group_with_a_reference_by_seed():
    """BENCHMARKS' "paired against the default" columns: differences on the seeds both groups ran only."""
    sys.path.insert(0, str(ROOT / "bench"))
    from budget_plot import paired

    def student(last: float) -> dict:
        return {"total_steps": 300, "curve": [{"step": 300, "accuracy": last}]}

    runs = {"mrpc-600-def-s42": student(0.80), "mrpc-600-def-s43": student(0.79), "mrpc-600-def-s44": student(0.81),
            "mrpc-600-pe90-s42": student(0.82), "mrpc-600-pe90-s43": student(0.78), "mrpc-600-pe90-s45": student(0.9),
            "sst2-600-def-s42": student(0.5)}  # fmt: skip
    assert paired("mrpc", runs, "mrpc-600-def") == [
        "mrpc mrpc-600-pe90 vs mrpc-600-def, paired by seed: s42 +0.0200, s43 -0.0100 = +0.0050 ± 0.0212"
    ]
    assert paired("mrpc", runs, "mrpc-600-none") == []


def test_budget_plot_prints_each_curve_and_each_groups_mean():
    """BENCHMARKS' "dev metric every N steps" rows and mean curves come from ``--curves``."""
    sys.path.insert(0, str(ROOT / "bench"))
    from budget_plot import curves

    def student(*values: float, target: tuple[float, ...] = ()) -> dict:
        points = [{"step": 100 * (i + 1), "pearson": v} for i, v in enumerate(values)]
        if target:
            points = [{**p, "target_sparsity": t} for p, t in zip(points, target, strict=True)]
        return {"total_steps": 200, "curve": points}

    runs = {"rating-200-def-s42": student(0.5, 0.7, target=(0.6125, 0.9)), "rating-200-def-s43": student(0.6, 0.8),
            "rating-200-pe90-s42": student(0.4, 0.9), "sst2-200-def-s42": student(0.1)}  # fmt: skip
    assert curves("movie-rating", runs) == [
        "movie-rating rating-200-def-s42 steps 100…200: 0.500 0.700",
        "movie-rating rating-200-def-s43 steps 100…200: 0.600 0.800",
        "movie-rating rating-200-def mean: 0.550 0.750",
        "movie-rating rating-200-def target sparsity %: 61.3 90.0",
        "movie-rating rating-200-pe90-s42 steps 100…200: 0.400 0.900",
    ]


def test_summarize_refreshes_an_earlier_results_file_and_adds_runs(tmp_path, capsys):
    """A committed results.json is its own manifest: each row is read again from the folder it names, new runs
    join by ``--run``-style name=folder, a row whose folder is gone stays as recorded, teachers carry over;
    every dev point carries the schedule's target sparsity at its step."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_pack import summarize

    def run_folder(name: str, accuracy: float) -> Path:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        records = [{"time": 0.0, "event": "start", "total_steps": 20, "mixed_precision": "no"},
                   {"time": 1.0, "step": 10, "loss": 1.0, "target_sparsity": 0.5},
                   {"time": 2.0, "step": 20, "loss": 0.5, "target_sparsity": 0.9},
                   {"time": 2.5, "step": 20, "event": "eval", "metrics": {"accuracy": accuracy}}]  # fmt: skip
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return folder

    run_folder("mrpc-20-a-s42", 0.7)
    (tmp_path / "runs" / "teachers-teacher-mrpc.json").write_text(json.dumps({"chosen": "t", "accuracy": 0.8}))
    first = summarize(tmp_path / "runs", tmp_path / "first.json")
    assert first["runs"]["mrpc-20-a-s42"]["curve"] == [{"step": 20, "accuracy": 0.7, "target_sparsity": 0.9}]
    first["runs"]["mrpc-20-gone-s42"] = {"source": str(tmp_path / "elsewhere"), "curve": [], "last_step": 5}
    (tmp_path / "first.json").write_text(json.dumps(first))

    (tmp_path / "runs" / "mrpc-20-a-s42" / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": 0.75}}))
    added = run_folder("elsewhere-b", 0.6)
    second = summarize(tmp_path / "first.json", tmp_path / "second.json", {"mrpc-20-b-s42": added})
    assert list(second["runs"]) == ["mrpc-20-a-s42", "mrpc-20-b-s42", "mrpc-20-gone-s42"]
    assert second["runs"]["mrpc-20-a-s42"]["final"] == {"accuracy": 0.75}  # read again from its folder
    assert second["runs"]["mrpc-20-b-s42"]["source"] == str(added.resolve())
    assert second["runs"]["mrpc-20-gone-s42"] == first["runs"]["mrpc-20-gone-s42"]
    assert second["teachers"] == {"teacher-mrpc": {"chosen": "t", "accuracy": 0.8}}
    assert "mrpc-20-gone-s42: folder" in capsys.readouterr().err
