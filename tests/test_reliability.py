"""Nothing lost, nothing silently wrong: one run per folder, inputs never deleted, changed-option and
diverged runs refused, every bad input a one-line error before anything is written."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VOCAB, cli, sentiment_rows, write_tsv
from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

from sparsebert import api
from sparsebert.errors import SparseBertError
from sparsebert.export import export_compressed, load
from sparsebert.pruning import Pruner

FAST = ["--max-seq-length", "16", "--batch-size", "16", "--eval-batch-size", "32", "--log-every", "2"]


def _finetune(model: Path, data: Path, out: Path, *extra) -> list:
    return ["finetune", "--model", model, "--task", "sst2", "--data-dir", data, "--output-dir", out, *FAST, *extra]


def _one_line_error(capsys, code: int, message: str) -> str:
    """Exit status 2 and one error line (progress bars may share stderr), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "sparsebert: error:" in line]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    return errors[0]


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tiny_model_dir, sst_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from sparsebert.io import claimed_output_dir
            with claimed_output_dir({str(out)!r}, overwrite=False, resume=False):
                print("held", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli(*_finetune(tiny_model_dir, sst_dir, out, "--max-steps", "1", "--overwrite"))
        _one_line_error(capsys, code, f"in use by another sparsebert run (PID {holder.pid})")
    finally:
        holder.communicate("")
    assert cli(*_finetune(tiny_model_dir, sst_dir, out, "--max-steps", "1", "--overwrite")) == 0  # free again


def test_resume_refuses_changed_options_but_not_logging_ones(tiny_model_dir, sst_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = _finetune(tiny_model_dir, sst_dir, out, "--max-steps", "6", "--save-every", "2", "--lr", "3e-3")
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_then_ctrl_c(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    assert cli(*args) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    changed = [a if a != "3e-3" else "1e-3" for a in args]
    _one_line_error(capsys, cli(*changed, "--resume"), "--lr 0.003 -> 0.001")
    # what is not given again comes from the run (nanoGPT's resume); logging cadence may change
    assert cli("finetune", "--output-dir", out, "--resume", "--log-every", "3") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 3e-3


def test_an_output_folder_overlapping_an_input_is_refused_and_nothing_deleted(teacher_dir, sst_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in sst_dir.iterdir()}
    code = cli(*_finetune(teacher_dir, sst_dir, sst_dir, "--overwrite"))  # output = the data
    _one_line_error(capsys, code, "overlaps the input")
    code = cli(*_finetune(teacher_dir, sst_dir, sst_dir / "inside", "--overwrite"))
    _one_line_error(capsys, code, "overlaps the input")
    prune = ["prune", "--teacher", teacher_dir, "--student", teacher_dir, "--task", "sst2", "--data-dir", sst_dir]
    _one_line_error(capsys, cli(*prune, "--output-dir", teacher_dir, "--overwrite"), "overlaps the input")
    _one_line_error(capsys, cli(*prune, "--output-dir", teacher_dir.parent, "--overwrite"), "overlaps the input")
    recipe = tmp_path / "out" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("lr: 0.001\n")
    code = cli(*_finetune(teacher_dir, sst_dir, tmp_path / "out", "--config", recipe, "--overwrite"))
    _one_line_error(capsys, code, "overlaps the input")
    assert {p.name: p.read_bytes() for p in sst_dir.iterdir()} == before
    assert (teacher_dir / "model.safetensors").exists() and recipe.exists()


def test_overwrite_deletes_only_what_sparsebert_wrote(tiny_model_dir, sst_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for name in ("config.yaml", "log.jsonl"):  # names a run folder has too: not proof that sparsebert wrote it
        (mine / name).write_text("mine")
    for flags in (["--overwrite"], ["--resume"], ["--resume", "--overwrite"]):
        code = cli(*_finetune(tiny_model_dir, sst_dir, mine, "--max-steps", "1", *flags))
        _one_line_error(capsys, code, "holds files that sparsebert did not write")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in mine.iterdir()) == [".sparsebert.lock", "config.yaml", "log.jsonl", "thesis.tex"]
    run = tmp_path / "run"
    assert cli(*_finetune(tiny_model_dir, sst_dir, run, "--max-steps", "1")) == 0
    assert cli(*_finetune(tiny_model_dir, sst_dir, run, "--max-steps", "2", "--overwrite")) == 0  # a run of ours
    assert json.loads((run / "log.jsonl").read_text().splitlines()[1])["total_steps"] == 2
    assert (run / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable like any saved model


@pytest.mark.parametrize(
    ("extra", "recipe", "message"),
    [
        (["--batch-size", "-4"], None, "--batch-size must be >= 1"),
        (["--batch-size", "0"], None, "--batch-size must be >= 1"),
        (["--lr", "-1"], None, "--lr must be a positive number"),
        (["--lr", "nan"], None, "--lr must be a positive number"),
        (["--max-steps", "0"], None, "--max-steps must be >= 1"),
        (["--max-seq-length", "1000"], None, "over the model's 64 positions"),
        (["--text-columns", "a,b,c"], None, "--text-columns takes one or two columns"),
        ([], 'overwrite: "no"\n', "option overwrite: expected true or false"),
        ([], "max_steps: 2.7\n", "option max_steps: expected a whole number"),
        ([], "batch_size: four\n", "option batch_size: expected a whole number"),
        ([], "lr: [1]\n", "option lr: expected a number"),
    ],
)
def test_bad_values_fail_in_one_line_before_anything_is_written(
    extra, recipe, message, tiny_model_dir, sst_dir, tmp_path, capsys
):
    out = tmp_path / "never"
    if recipe is not None:
        (tmp_path / "r.yaml").write_text(recipe)
        extra = [*extra, "--config", tmp_path / "r.yaml"]
    _one_line_error(capsys, cli(*_finetune(tiny_model_dir, sst_dir, out, *extra)), message)
    assert not out.exists()


def test_temperature_must_be_positive(teacher_dir, sst_dir, tmp_path, capsys):
    args = ["prune", "--teacher", teacher_dir, "--student", teacher_dir, "--task", "sst2", "--data-dir", sst_dir]
    code = cli(*args, "--output-dir", tmp_path / "o", "--temperature", "0")
    _one_line_error(capsys, code, "--temperature must be a positive number")
    assert not (tmp_path / "o").exists()


def test_a_diverged_run_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, sst_dir, tmp_path, monkeypatch, capsys
):
    calls = {"n": 0}
    step = api.classification_step

    def nan_from_step_4(model, batch):
        calls["n"] += 1
        loss, parts = step(model, batch)
        return (loss * float("nan") if calls["n"] >= 4 else loss), parts

    monkeypatch.setattr(api, "classification_step", nan_from_step_4)
    out = tmp_path / "run"
    code = cli(*_finetune(tiny_model_dir, sst_dir, out, "--max-steps", "8", "--save-every", "2", "--log-every", "5"))
    _one_line_error(capsys, code, "not-a-number or infinite values at step 4")
    assert (out / "checkpoint").is_dir() and not (out / "metrics.json").exists()
    records = [json.loads(line, parse_constant=pytest.fail) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"event": "non_finite", "step": 4}.items() <= records[-1].items()
    state = (
        torch.load(out / "checkpoint" / "pytorch_model.bin", weights_only=True)
        if (out / "checkpoint" / "pytorch_model.bin").exists()
        else None
    )
    if state is None:
        from safetensors.torch import load_file

        state = load_file(out / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())  # the step-2 checkpoint, untouched


def test_a_student_with_a_shuffled_vocabulary_is_refused(teacher_dir, sst_dir, tmp_path, capsys):
    student = tmp_path / "student"
    AutoModelForSequenceClassification.from_pretrained(teacher_dir).save_pretrained(student)
    shuffled = [*VOCAB[:5], *reversed(VOCAB[5:])]  # same size, other ids
    BertTokenizerFast(vocab={w: i for i, w in enumerate(shuffled)}).save_pretrained(student)
    args = ["prune", "--teacher", teacher_dir, "--student", student, "--task", "sst2", "--data-dir", sst_dir]
    _one_line_error(capsys, cli(*args, "--output-dir", tmp_path / "o", *FAST), "different vocabularies")


def test_non_utf8_data_names_the_file_line_and_byte(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "SST-2"
    data.mkdir()
    write_tsv(data / "dev.tsv", ["sentence", "label"], [list(r) for r in sentiment_rows(8, 1)])
    lines = ["sentence\tlabel", "good film\t1", "bad film\t0"]
    (data / "train.tsv").write_bytes(("\n".join(lines) + "\n").encode() + b"caf\xe9 film\t1\n")
    code = cli(*_finetune(tiny_model_dir, data, tmp_path / "o"))
    _one_line_error(capsys, code, "train.tsv:4: not UTF-8 text (byte 0xe9")


def test_a_truncated_teacher_is_a_one_line_error(teacher_dir, sst_dir, tmp_path, capsys):
    broken = tmp_path / "teacher"
    broken.mkdir()
    for item in teacher_dir.iterdir():
        if item.is_file():
            data = item.read_bytes()
            (broken / item.name).write_bytes(data[: len(data) // 2] if item.suffix == ".safetensors" else data)
    args = ["prune", "--teacher", broken, "--student", teacher_dir, "--task", "sst2", "--data-dir", sst_dir]
    _one_line_error(capsys, cli(*args, "--output-dir", tmp_path / "o"), "damaged or truncated")


def _export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    Pruner.one_shot(model, 0.9)
    export_compressed(model, tmp_path / "csr")
    return tmp_path / "csr"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "sparse.safetensors").write_bytes((d / "sparse.safetensors").read_bytes()[:100]), "checksum"),
        (lambda d: (d / "sparse.safetensors").unlink(), "missing from the compressed model"),
        (lambda d: (d / "sparsebert_manifest.json").write_text("{not json"), "not a valid manifest"),
        (lambda d: _flip_last_byte(d / "dense.safetensors"), "checksum mismatch"),
    ],
)
def test_a_damaged_export_is_refused(damage, message, tmp_path):
    folder = _export(tmp_path)
    load(folder)  # intact: loads
    damage(folder)
    with pytest.raises(SparseBertError, match=message):
        load(folder)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, sst_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert cli(*_finetune(tiny_model_dir, sst_dir, out, "--max-steps", "4")) == 0
    return out


KILLER = """
import os, signal, sys
from pathlib import Path

import accelerate

from sparsebert.cli import main

where, kill_at, calls = sys.argv[1], int(sys.argv[2]), {"n": 0}
save_state, rename = accelerate.Accelerator.save_state, Path.rename


def dying_save_state(self, output_dir=None, **kwargs):  # power lost in the middle of writing a checkpoint
    calls["n"] += 1
    result = save_state(self, output_dir, **kwargs)
    if calls["n"] == kill_at:
        written = sorted(p for p in Path(output_dir).iterdir() if p.is_file())
        written[0].write_bytes(written[0].read_bytes()[:10])
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def dying_rename(self, target):  # power lost between moving the last checkpoint aside and the new one in
    result = rename(self, target)  # ("swap"), or right after the new one is in ("swapped")
    if Path(target).name == {"swap": "checkpoint.prev", "swapped": "checkpoint"}[where]:
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return result


if where == "write":
    accelerate.Accelerator.save_state = dying_save_state
else:
    Path.rename = dying_rename
main(sys.argv[3:])
"""


@pytest.mark.parametrize(("where", "choices"), [("write", [2, 3]), ("swap", [1, 2]), ("swapped", [2])])
def test_kill_9_during_a_checkpoint_then_resume_gives_the_same_weights(where, choices, teacher_dir, sst_dir, tmp_path):
    import random

    from safetensors.torch import load_file

    kill_at = random.Random(where).choice(choices)  # a seeded "random" checkpoint to die in
    args = ["prune", "--teacher", teacher_dir, "--student", teacher_dir, "--task", "sst2", "--data-dir", sst_dir]
    args += ["--sparsity", "0.6", "--max-steps", "8", "--save-every", "2", "--prune-updates", "4", *FAST]
    assert cli(*args, "--output-dir", tmp_path / "straight") == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLER, where, str(kill_at), *map(str, args), "--output-dir", str(out)]
    died = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    assert cli(*args, "--output-dir", out, "--resume") == 0
    # it went on from the newest complete checkpoint: the one before the write that died (the torn one has
    # no manifest), the new one still under its temporary name (its manifest was written: the swap's first
    # rename is counted from the second save on), or the new one in place
    expected = {"write": 2 * (kill_at - 1), "swap": 2 * (kill_at + 1), "swapped": 2 * kill_at}[where]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == ([expected] if expected else [])
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == sorted(set(logged)), logged  # the steps run again after the resume are logged once
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name


def test_an_interrupt_in_the_final_evaluation_loses_no_training(teacher_dir, sst_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from sparsebert import train

    args = ["prune", "--teacher", teacher_dir, "--student", teacher_dir, "--task", "sst2", "--data-dir", sst_dir]
    args += ["--sparsity", "0.6", "--max-steps", "6", "--save-every", "4", "--eval-every", "0", *FAST]
    assert cli(*args, "--output-dir", tmp_path / "straight") == 0
    evaluate = train.evaluate

    def ctrl_c(*a, **k):  # the run's only evaluation is the final one
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate", ctrl_c)
    out = tmp_path / "run"
    assert cli(*args, "--output-dir", out) == 130
    assert "if one was written" in capsys.readouterr().err  # no claim of a checkpoint it did not write now
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert cli(*args, "--output-dir", out, "--resume") == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [6]  # the last step was saved
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not (out / "checkpoint").exists()  # a finished run keeps no checkpoint


def test_a_finished_stage_is_reused_only_with_its_own_options(teacher_dir):
    import yaml

    from sparsebert.config import FinetuneConfig

    saved = yaml.safe_load((teacher_dir / "config.yaml").read_text())
    same = FinetuneConfig.of(**saved)
    assert api.run_stage(same, lambda config: pytest.fail("a finished stage ran again")) is False
    changed = dataclasses.replace(same, training=dataclasses.replace(same.training, lr=2 * same.training.lr))
    with pytest.raises(SparseBertError, match=r"holds a finished run with other options .*--lr"):
        api.run_stage(changed, lambda config: pytest.fail("ran"))


def test_a_pruning_window_that_ends_at_step_0_still_prunes(teacher_dir, sst_dir, tmp_path):
    out = tmp_path / "run"
    args = ["prune", "--teacher", teacher_dir, "--student", teacher_dir, "--task", "sst2", "--data-dir", sst_dir]
    assert cli(*args, "--sparsity", "0.6", "--max-steps", "3", "--prune-end", "0.001", *FAST, "--output-dir", out) == 0
    assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(0.6, abs=0.01)


def test_evaluate_on_a_damaged_export_and_an_unwritable_output_are_one_line_errors(
    tiny_model_dir, sst_dir, tmp_path, capsys
):
    folder = _export(tmp_path)
    _flip_last_byte(folder / "sparse.safetensors")
    code = cli("evaluate", "--model", folder, "--task", "sst2", "--data-dir", sst_dir)
    _one_line_error(capsys, code, "checksum mismatch")
    (tmp_path / "a-file").write_text("not a folder")
    code = cli(*_finetune(tiny_model_dir, sst_dir, tmp_path / "a-file" / "run"))  # a file cannot hold a folder
    _one_line_error(capsys, code, "cannot write to output directory")


def test_logs_and_json_files_are_strict_json(tmp_path):
    from sparsebert.io import JsonlLog, atomic_write_json

    JsonlLog(tmp_path / "log.jsonl").write({"pearson": float("nan"), "loss": [1.0, float("inf")]})
    atomic_write_json(tmp_path / "m.json", {"metrics": {"pearson": float("nan")}})
    strict = {"parse_constant": pytest.fail}
    assert json.loads((tmp_path / "log.jsonl").read_text(), **strict) == {"pearson": None, "loss": [1.0, None]}
    assert json.loads((tmp_path / "m.json").read_text(), **strict) == {"metrics": {"pearson": None}}


@pytest.mark.parametrize(
    ("names", "refused"),
    [
        (["entailment", "neutral", "contradiction"], True),  # the task's labels in another order
        (["contradiction", "entailment", "neutral"], False),
        (["LABEL_0", "LABEL_1", "LABEL_2"], False),  # nothing to check
    ],
)
def test_a_head_with_the_task_labels_in_another_order_is_refused(tiny_model_dir, tmp_path, names, refused):
    from sparsebert.models import load_model
    from sparsebert.tasks import get_task

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    model.save_pretrained(tmp_path / "head")
    if refused:
        with pytest.raises(SparseBertError, match=r"entailment, neutral, contradiction \(in this order\)"):
            load_model(tmp_path / "head", get_task("mnli"))
    else:
        assert load_model(tmp_path / "head", get_task("mnli")).config.id2label[0] == "contradiction"


def test_compress_checks_its_inputs_before_emptying_its_folder(tiny_model_dir, tmp_path, capsys):
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / ".sparsebert").touch()  # an earlier run's folder
    (previous / "report.md").write_text("hours of results")
    args = ["compress", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", tmp_path / "typo"]
    _one_line_error(capsys, cli(*args, "--output-dir", previous, "--overwrite"), "typo")
    assert (previous / "report.md").read_text() == "hours of results"


@pytest.mark.parametrize("end, status", [("", 0), ("from sparsebert.cli import _exit; _exit(3)", 3)])
def test_a_process_group_is_left_before_the_interpreter_exits(end, status, tmp_path):
    """A job under ``accelerate launch`` (here one process in a gloo group) leaves its process group at exit,
    whether a user's script ran it or the CLI, which then ends the process without the interpreter's
    teardown (``cli._exit``) but with its status, after every exit handler. The script's own exit hook,
    registered first, runs last and sees the group gone."""
    script = textwrap.dedent(f"""
        import atexit, os
        import torch.distributed as dist
        atexit.register(lambda: print("group at exit:", dist.is_initialized(), flush=True))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        from sparsebert.train import new_accelerator
        new_accelerator(cpu=True), new_accelerator(cpu=True)  # two jobs in one process, like compress
        {end}
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "group at exit: False", done.stdout
