"""Damaged run folders: every file read back is checked (a one-line error, exit 2, nothing deleted), and
a damaged last checkpoint costs only the steps since the one before it (two are kept, each with digests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import STSB_HEADER, cli, sentiment_rows, write_tsv
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sparsebert import checkpoints

FAST = ["--max-seq-length", "16", "--batch-size", "16", "--eval-batch-size", "32", "--log-every", "2"]


def _prune_args(teacher: Path, sst_dir: Path) -> list:
    args = ["prune", "--teacher", teacher, "--student", teacher, "--task", "sst2", "--data-dir", sst_dir]
    return [*args, "--sparsity", "0.6", "--max-steps", "8", "--save-every", "2", "--prune-updates", "4", *FAST]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sst_dir, tmp_path_factory) -> dict[str, Path]:
    """A teacher, a straight 8-step prune run, and the same run stopped by Ctrl-C in step 7 (checkpoints
    of steps 6 and 7 kept: the latest written on the interrupt, the one before it at step 6)."""
    root = tmp_path_factory.mktemp("damaged")
    teacher = root / "teacher"
    args = ["finetune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", sst_dir, *FAST, "--max-steps", "4"]
    assert cli(*args, "--output-dir", teacher) == 0
    prune = _prune_args(teacher, sst_dir)
    assert cli(*prune, "--output-dir", root / "straight") == 0
    calls, original = {"n": 0}, torch.optim.AdamW.step

    def step_then_ctrl_c(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
        assert cli(*prune, "--output-dir", root / "stopped") == 130
    return {"teacher": teacher, "straight": root / "straight", "stopped": root / "stopped", "args": prune}


def _copy(runs: dict, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["stopped"], out)
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def remove(path: Path) -> None:
    path.unlink()


DAMAGES = [truncate, empty, flip_middle, remove]
CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                    "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", checkpoints.MANIFEST]  # fmt: skip


def _one_line_error(capsys, code: int, *said: str) -> str:
    """Exit status 2 and one error line (progress bars may share stderr), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "sparsebert: error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert all(s in errors[0] for s in said), errors[0]
    return errors[0]


def _resumes(runs: dict, out: Path) -> list[dict]:
    assert cli(*runs["args"], "--output-dir", out, "--resume") == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _same_model(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name


def test_the_stopped_run_keeps_two_checkpoints_with_digests(runs):
    stopped = runs["stopped"]
    assert [checkpoints.step_of(stopped / n) for n in (checkpoints.LATEST, checkpoints.PREVIOUS)] == [7, 6]
    for name in (checkpoints.LATEST, checkpoints.PREVIOUS):
        assert checkpoints.problem(stopped / name) is None
        assert set(CHECKPOINT_FILES) <= {p.name for p in (stopped / name).iterdir()}


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["model.safetensors", "custom_checkpoint_1.pkl", "optimizer.bin"])
def test_a_damaged_last_checkpoint_resumes_from_the_one_before_exactly(name, damage, runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    damage(out / checkpoints.LATEST / name)
    records = _resumes(runs, out)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [6]
    said = " ".join(r["message"] for r in records if r.get("event") == "checkpoint_damaged")
    assert name in said and "resuming from the checkpoint of step 6" in said
    assert (out / "checkpoint.damaged" / checkpoints.MANIFEST).exists()  # moved aside, not deleted
    _same_model(runs["straight"], out)  # same weights (and masks: the zeros are in them) as never stopped
    straight = json.loads((runs["straight"] / "sparsity.json").read_text())
    assert json.loads((out / "sparsity.json").read_text())["matrices"] == straight["matrices"]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_no_good_checkpoint_is_one_line_and_touches_nothing(damage, runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    damage(out / checkpoints.LATEST / "model.safetensors")
    damage(out / checkpoints.PREVIOUS / checkpoints.MANIFEST)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code = cli(*runs["args"], "--output-dir", out, "--resume")
    _one_line_error(capsys, code, "no good checkpoint", "model.safetensors", "--overwrite")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def cut_after_a_key(path: Path) -> None:
    """Cut where a key's value begins: still YAML, the value a null ("log_every:")."""
    text = path.read_text()
    path.write_text(text[: text.index("log_every:") + len("log_every:")] + "\n")


@pytest.mark.parametrize("damage", [truncate, empty, flip_middle, cut_after_a_key], ids=lambda f: f.__name__)
def test_a_damaged_config_yaml_is_one_line(damage, runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    (out / "config.yaml").write_text((out / "config.yaml").read_text() + "teacher: [unclosed\n")
    damage(out / "config.yaml")
    _one_line_error(capsys, cli(*runs["args"], "--output-dir", out, "--resume"), "config.yaml", "--overwrite")
    assert checkpoints.problem(out / checkpoints.LATEST) is None  # nothing touched


def test_a_log_cut_mid_line_resumes(runs, tmp_path):
    out = _copy(runs, tmp_path)
    truncate(out / "log.jsonl")
    records = _resumes(runs, out)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [7]
    _same_model(runs["straight"], out)


def test_a_torn_save_after_two_good_ones_is_dropped(runs, tmp_path):
    out = _copy(runs, tmp_path)
    shutil.copytree(out / checkpoints.LATEST, out / checkpoints.PARTIAL)
    (out / checkpoints.PARTIAL / checkpoints.MANIFEST).unlink()  # the save was killed before its manifest
    truncate(out / checkpoints.PARTIAL / "model.safetensors")
    records = _resumes(runs, out)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [7]
    assert not any(r.get("event") == "checkpoint_damaged" for r in records)


RESULT_FILES = ("teacher/metrics.json", "student/metrics.json", "student/sparsity.json")
# (a stage without metrics.json is unfinished: it runs again, so only sparsity.json is removed)
DAMAGED_RESULTS = [(n, d) for n in RESULT_FILES for d in (truncate, empty, flip_middle)] + [(RESULT_FILES[2], remove)]


@pytest.mark.parametrize(("name", "damage"), DAMAGED_RESULTS, ids=lambda v: getattr(v, "__name__", v))
def test_compress_resume_with_a_damaged_result_is_one_line(name, damage, tiny_model_dir, sst_dir, tmp_path, capsys):
    args = ["compress", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", sst_dir, *FAST, "--sparsity", "0.5",
            "--teacher-max-steps", "2", "--max-steps", "2", "--output-dir", tmp_path / "c"]  # fmt: skip
    if not (tmp_path / "c").exists():
        assert cli(*args) == 0
    damage(tmp_path / "c" / name)
    capsys.readouterr()
    _one_line_error(capsys, cli(*args, "--resume"), Path(name).name)


def _regression_model(tiny_model_dir: Path, folder: Path) -> Path:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, problem_type="regression")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_a_regression_head_is_refused_for_a_classification_task(tiny_model_dir, sst_dir, tmp_path, capsys):
    model = _regression_model(tiny_model_dir, tmp_path / "reg")
    code = cli("evaluate", "--model", model, "--task", "sst2", "--data-dir", sst_dir)
    _one_line_error(capsys, code, "a regression head but task sst2 is a classification task")
    inputs = write_tsv(tmp_path / "in.tsv", ["sentence"], [["good film"], ["bad film"]])
    code = cli("predict", "--model", model, "--task", "sst2", "--input", inputs, "--output", tmp_path / "p.jsonl")
    _one_line_error(capsys, code, "regression head")
    assert not (tmp_path / "p.jsonl").exists()


def test_a_classification_head_is_refused_for_a_regression_task(runs, tmp_path, capsys):
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    rows = [[i, "g", "f", 2020, i, "s", "s", a, b, 2.5] for i, (a, b) in enumerate(sentiment_rows(16, 3))]
    write_tsv(stsb / "dev.tsv", STSB_HEADER, rows)
    code = cli("evaluate", "--model", runs["teacher"], "--task", "stsb", "--data-dir", stsb)
    _one_line_error(capsys, code, "a classification head but task stsb is a regression task")


def _fake_checkpoint(folder: Path, step: int | None) -> Path:
    """A checkpoint folder with one file; a manifest unless ``step`` is None (an older version's)."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes([step or 0]) * 64)
    if step is not None:
        checkpoints.write_manifest(folder, step)
    return folder


@pytest.mark.parametrize(
    ("present", "latest", "previous"),
    [
        ({"checkpoint.tmp": 8, "checkpoint.prev": 6}, 8, 6),  # killed after the last checkpoint was moved aside
        ({"checkpoint.tmp": 8, "checkpoint": 6}, 8, 6),  # killed after the older one was discarded
        ({"checkpoint.tmp": 8, "checkpoint": 6, "checkpoint.prev": 4}, 8, 6),  # killed before that
        ({"checkpoint.prev": 6, "checkpoint.trash": 4}, 6, None),  # killed while discarding
        ({"checkpoint": None}, None, None),  # an older version's folder: taken as it is
        ({"checkpoint.old": None, "checkpoint.tmp": None}, None, None),  # an older version killed mid-swap
    ],
)
def test_every_state_a_kill_can_leave_settles_to_the_newest_good_checkpoint(present, latest, previous, tmp_path):
    for name, step in present.items():
        _fake_checkpoint(tmp_path / name, step)
    assert checkpoints.exists(tmp_path)
    settled = checkpoints.settle(tmp_path)
    assert settled.step == latest and settled.notes == []
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["checkpoint"] if previous is None else ["checkpoint", "checkpoint.prev"])
    if latest is not None:
        assert checkpoints.step_of(tmp_path / "checkpoint") == latest
    if previous is not None:
        assert checkpoints.step_of(tmp_path / "checkpoint.prev") == previous
    assert checkpoints.settle(tmp_path).step == latest  # settling again changes nothing


def test_a_finished_run_is_not_resumed_from_a_leftover_checkpoint(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["straight"], out)
    _fake_checkpoint(out / "checkpoint.prev", 6)  # a kill while the finished run dropped its checkpoints
    code = cli(*runs["args"], "--output-dir", out, "--resume")
    _one_line_error(capsys, code, "holds a finished run")
    assert (out / "checkpoint.prev").is_dir()


def test_a_tracker_whose_package_is_missing_is_one_line(runs, tmp_path, monkeypatch, capsys):
    from sparsebert import train

    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None)
    code = cli(*runs["args"], "--output-dir", tmp_path / "o", "--report-to", "wandb")
    _one_line_error(capsys, code, "--report-to wandb needs the package: pip install wandb")
