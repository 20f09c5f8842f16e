"""finetune -> evaluate -> prune through the CLI on a tiny random BERT, resume, errors, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, outputs_of
from safetensors.torch import load_file
from transformers import AutoConfig

from sparsebert.io import JsonlLog
from sparsebert.report import dev_curves, plot_run

FAST = ["--max-seq-length", "16", "--batch-size", "16", "--eval-batch-size", "32", "--log-every", "2"]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, sst_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    code = cli(
        "finetune",
        "--model",
        tiny_model_dir,
        "--task",
        "sst2",
        "--data-dir",
        sst_dir,
        "--output-dir",
        out,
        "--epochs",
        "8",
        "--lr",
        "3e-3",
        *FAST,
    )
    assert code == 0
    return out


def test_finetune_writes_an_hf_model_and_learns(teacher, sst_dir, tmp_path, capsys):
    record = json.loads((teacher / "metrics.json").read_text())
    assert record["task"] == "sst2" and record["split"] == "dev" and record["num_examples"] == 64
    assert record["metrics"]["accuracy"] > 0.9  # the opinion word decides the label
    assert {"config.yaml", "log.jsonl", "config.json", "model.safetensors"} <= {p.name for p in teacher.iterdir()}
    assert not (teacher / "checkpoint").exists()
    logits = outputs_of(teacher, ["the movie was great", "the movie was awful"])  # plain transformers
    assert logits.argmax(-1).tolist() == [1, 0]
    # evaluate reproduces the metrics file
    code = cli(
        "evaluate",
        "--model",
        teacher,
        "--task",
        "sst2",
        "--data-dir",
        sst_dir,
        "--max-seq-length",
        "16",
        "--output",
        tmp_path / "m.json",
    )
    assert code == 0
    assert json.loads((tmp_path / "m.json").read_text()) == record
    assert "accuracy" in capsys.readouterr().out


def test_prune_reaches_the_target_and_saves_zeros(teacher, tiny_model_dir, sst_dir, tmp_path):
    out = tmp_path / "sparse"
    code = cli(
        "prune",
        "--teacher",
        teacher,
        "--student",
        tiny_model_dir,
        "--task",
        "sst2",
        "--data-dir",
        sst_dir,
        "--output-dir",
        out,
        "--sparsity",
        "0.8",
        "--epochs",
        "6",
        "--lr",
        "3e-3",
        "--prune-updates",
        "10",
        *FAST,
    )
    assert code == 0
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["overall"] == pytest.approx(0.8, abs=1e-3)
    assert len(sparsity["matrices"]) == 12 and 0 < sparsity["model"] < 0.8
    weights = load_file(out / "model.safetensors")
    for name, value in sparsity["matrices"].items():
        w = weights[name + ".weight"]
        assert float((w == 0).float().mean()) == pytest.approx(value)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] > 0.75
    parts = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss_hidden" in r]
    assert parts and {"loss_attention", "loss_prediction", "target_sparsity"} <= set(parts[-1])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize(
    "extra",
    [
        ["--prune-criterion", "magnitude"],
        ["--prune-criterion", "taylor"],  # its scores must resume too
        ["--prune-criterion", "obs", "--fisher-block", "16"],  # and the Fisher, which also moves the weights
        ["--average-weights", "--prune-end", "0.4"],  # stopped at step 11 of the average's steps 8-20
        ["--average-weights", "--prune-end", "0.8"],  # stopped at step 11, before the average's steps 16-20
    ],
)
def test_interrupted_prune_resumes_to_the_same_model(extra, teacher, tiny_model_dir, sst_dir, tmp_path, monkeypatch):
    args = [
        "prune",
        "--teacher",
        teacher,
        "--student",
        tiny_model_dir,
        "--task",
        "sst2",
        "--data-dir",
        sst_dir,
        "--sparsity",
        "0.7",
        "--max-steps",
        "20",
        "--save-every",
        "4",
        "--prune-updates",
        "10",
        *extra,
        *FAST,
    ]
    assert cli(*args, "--output-dir", tmp_path / "straight") == 0

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_then_ctrl_c(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # Ctrl-C arrives in the middle of step 11
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    assert cli(*args, "--output-dir", tmp_path / "resumed") == 130
    assert (tmp_path / "resumed" / "checkpoint").is_dir() and not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert cli(*args, "--output-dir", tmp_path / "resumed") == 2  # non-empty folder is refused...
    assert cli(*args, "--output-dir", tmp_path / "resumed", "--resume") == 0  # ...unless resumed
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert {"event": "interrupted", "step": 11}.items() <= next(
        r for r in log if r.get("event") == "interrupted"
    ).items()
    assert any(r.get("event") == "resume" for r in log)


def test_averaged_weights_are_the_same_run_s_mean_with_its_masks(teacher, tiny_model_dir, sst_dir, tmp_path):
    """The average is a shadow: training (and so the masks and the last weights) is the run without it."""
    args = ["prune", "--teacher", teacher, "--student", tiny_model_dir, "--task", "sst2", "--data-dir", sst_dir,
            "--sparsity", "0.8", "--max-steps", "24", "--prune-end", "0.5", "--prune-updates", "6",
            "--eval-every", "8", "--lr", "3e-3", *FAST]  # fmt: skip
    assert cli(*args, "--output-dir", tmp_path / "last") == 0
    assert cli(*args, "--output-dir", tmp_path / "mean", "--average-weights") == 0
    last, mean = _weights(tmp_path / "last"), _weights(tmp_path / "mean")
    matrices = json.loads((tmp_path / "mean" / "sparsity.json").read_text())["matrices"]
    assert json.loads((tmp_path / "last" / "sparsity.json").read_text())["matrices"] == matrices
    for name in matrices:
        assert torch.equal(last[name + ".weight"] == 0, mean[name + ".weight"] == 0), name
    assert any(not torch.allclose(last[k], mean[k]) for k in last)
    log = [json.loads(line) for line in (tmp_path / "mean" / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in log if r.get("event") == "eval"}
    assert "metrics_average" not in evals[8] and "metrics_average" in evals[16]  # from step 12 on
    end = next(r for r in log if r.get("event") == "eval_last_weights")
    assert end["averaged_steps"] == 13  # steps 12..24
    assert end["metrics"] == json.loads((tmp_path / "last" / "metrics.json").read_text())["metrics"]
    assert evals[24]["metrics"] == json.loads((tmp_path / "mean" / "metrics.json").read_text())["metrics"]
    curves = dev_curves(log)  # the plot: one line each
    last_curve, average_curve = curves["last"], curves["average"]
    assert [s for s, _ in last_curve] == [8, 16, 24] and last_curve[-1][1] == end["metrics"]
    assert [s for s, _ in average_curve] == [16, 24] and average_curve[-1][1] == evals[24]["metrics"]
    assert (tmp_path / "mean" / "dev.png") in plot_run(tmp_path / "mean")
    stopped = dev_curves(log[: log.index(evals[24])])  # stopped before the average's own evaluation
    assert stopped["last"] == last_curve and stopped["average"] == average_curve[:-1]


def test_the_average_waits_for_the_masks_to_be_final(teacher, tiny_model_dir, sst_dir, tmp_path):
    """--prune-end before --prune-start: the schedule ends at the start (step 6), and so does the average."""
    out = tmp_path / "run"
    assert cli("prune", "--teacher", teacher, "--student", tiny_model_dir, "--task", "sst2", "--data-dir", sst_dir,
               "--sparsity", "0.8", "--max-steps", "10", "--prune-start", "0.6", "--prune-end", "0.2",
               "--average-weights", "--output-dir", out, *FAST) == 0  # fmt: skip
    end = next(r for r in JsonlLog(out / "log.jsonl").read() if r.get("event") == "eval_last_weights")
    assert end["averaged_steps"] == 5  # steps 6..10
    assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["finetune", "--model", "{model}", "--task", "sst2", "--data-dir", "/no/such/dir", "--output-dir", "{out}"],
            "/no/such/dir: data directory not found",
        ),
        (
            [
                "finetune",
                "--model",
                "./missing-model",
                "--task",
                "sst2",
                "--data-dir",
                "{data}",
                "--output-dir",
                "{out}",
            ],
            "model path ./missing-model does not exist",
        ),
        (
            ["finetune", "--model", "{model}", "--task", "nope", "--data-dir", "{data}", "--output-dir", "{out}"],
            "unknown task 'nope'",
        ),
        (["finetune", "--model", "{model}", "--task", "sst2", "--data-dir", "{data}"], "missing required option"),
        (
            [
                "prune",
                "--teacher",
                "{model}",
                "--student",
                "{model}",
                "--task",
                "sst2",
                "--data-dir",
                "{data}",
                "--output-dir",
                "{out}",
                "--sparsity",
                "1.5",
            ],
            "sparsity must satisfy",
        ),
        (["finetune", "--config", "{out}.yaml", "--model", "{model}"], "recipe file not found"),
    ],
)
def test_cli_errors_are_one_line(args, message, tiny_model_dir, sst_dir, tmp_path, capsys):
    filled = [a.format(model=tiny_model_dir, data=sst_dir, out=tmp_path / "o") for a in args]
    assert cli(*filled) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsebert: error:") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_recipe_file_with_flag_override(tiny_model_dir, sst_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\ntask: sst2\ndata-dir: {sst_dir}\nmax_steps: 3\nlr: 1.0e-3\nmax_seq_length: 16\n"
    )
    assert cli("finetune", "--config", recipe, "--max-steps", "2", "--output-dir", tmp_path / "o") == 0
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert next(r for r in log if r.get("event") == "start")["total_steps"] == 2
    assert "lr: 0.001" in (tmp_path / "o" / "config.yaml").read_text()
    recipe.write_text("modle: x\n")
    assert cli("finetune", "--config", recipe) == 2


def _launch_two(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "sparsebert",
        *map(str, args),
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["finetune", "prune", "distill-dense"])
def test_two_processes_stay_identical(command, teacher, tiny_model_dir, sst_dir, tmp_path):
    out = tmp_path / command
    common = ["--task", "sst2", "--data-dir", sst_dir, "--output-dir", out, "--max-steps", "6", *FAST]
    if command == "finetune":
        args = ["finetune", "--model", tiny_model_dir, *common]
    elif command == "distill-dense":  # a narrow student: its projection to the teacher's width is trained too
        args = ["prune", "--strategy", "distill-dense", "--teacher", teacher, "--student", tiny_model_dir]
        args += ["--sparsity", "0.8", *common]
    else:
        args = [
            "prune",
            "--teacher",
            teacher,
            "--student",
            tiny_model_dir,
            "--sparsity",
            "0.5",
            "--prune-updates",
            "3",
            *common,
        ]
    done = _launch_two(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r.get("event") == "start")
    end = next(r for r in log if r.get("event") == "end")
    assert start["processes"] == 2
    assert len(end["rank_digests"]) == 2 and end["ranks_in_sync"]
    record = json.loads((out / "metrics.json").read_text())
    assert record["num_examples"] == 64  # gathered once, not duplicated across ranks
    if command == "prune":
        assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(0.5, abs=1e-3)
    if command == "distill-dense":
        assert json.loads((out / "config.json").read_text())["hidden_size"] < 32  # narrower than the teacher


def test_compress_runs_both_stages_and_reports(tiny_model_dir, sst_dir, tmp_path, capsys):
    out = tmp_path / "c"
    args = [
        "compress",
        "--model",
        tiny_model_dir,
        "--task",
        "sst2",
        "--data-dir",
        sst_dir,
        "--output-dir",
        out,
        "--teacher-epochs",
        "4",
        "--teacher-lr",
        "3e-3",
        "--max-steps",
        "24",
        "--lr",
        "3e-3",
        "--sparsity",
        "0.75",
        "--prune-updates",
        "5",
        "--eval-every",
        "8",
        *FAST,
    ]
    assert cli(*args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["pruned_layers"] == pytest.approx(0.75, abs=1e-3)
    nz = report["nonzero_params"]
    assert nz["pruned_layers"] == pytest.approx(nz["pruned_layers_total"] / 4, abs=2)
    flops = report["flops_per_sequence"]
    assert flops["dense"] > flops["sparse"] > 0
    assert set(report["teacher"]) == set(report["student"]) == {"accuracy"}
    assert "| teacher |" in capsys.readouterr().out
    for name in ("teacher/loss.png", "student/loss.png", "student/dev.png", "student/sparsity.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert "![student/dev.png](student/dev.png)" in (out / "report.md").read_text()
    # a finished compress is not redone with --resume: both stages are skipped
    teacher_mtime = (out / "teacher" / "model.safetensors").stat().st_mtime
    assert cli(*args, "--resume") == 0
    assert cli("compress", "--output-dir", out, "--resume") == 0  # the options not given come from the run
    assert (out / "teacher" / "model.safetensors").stat().st_mtime == teacher_mtime


def _stsb_and_cola(tmp_path: Path) -> dict[str, Path]:
    """An STS-B folder (regression, 10 columns) and a CoLA folder (no header), from the same sentences."""
    from conftest import STSB_HEADER, sentiment_rows, write_tsv

    stsb, cola = tmp_path / "STS-B", tmp_path / "CoLA"
    stsb.mkdir()
    cola.mkdir()
    header = STSB_HEADER
    for split, seed, n in (("train", 5, 96), ("dev", 6, 32)):
        rows = sentiment_rows(n, seed)
        write_tsv(
            stsb / f"{split}.tsv",
            header,
            [
                [i, "main", "f", "2012", i, "n", "n", a, b, f"{1.0 * la:.3f}"]
                for i, ((a, la), (b, _)) in enumerate(zip(rows, rows[1:] + rows[:1], strict=True))
            ],
        )
        write_tsv(cola / f"{split}.tsv", None, [["src", label, "", text] for text, label in rows])
    return {"stsb": stsb, "cola": cola}


@pytest.mark.parametrize("task", ["stsb", "cola"])
def test_regression_and_mcc_tasks_run_through_finetune_and_prune(task, tiny_model_dir, tmp_path):
    data = _stsb_and_cola(tmp_path)[task]
    common = ["--task", task, "--data-dir", data, "--lr", "3e-3", *FAST]
    assert cli("finetune", "--model", tiny_model_dir, "--output-dir", tmp_path / "t", "--epochs", "6", *common) == 0
    assert (
        cli(
            "prune",
            "--teacher",
            tmp_path / "t",
            "--student",
            tiny_model_dir,
            "--output-dir",
            tmp_path / "s",
            "--max-steps",
            "12",
            "--sparsity",
            "0.5",
            "--prune-updates",
            "4",
            *common,
        )
        == 0
    )
    teacher = json.loads((tmp_path / "t" / "metrics.json").read_text())["metrics"]
    student = json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"]
    expected = {"stsb": {"pearson", "spearman"}, "cola": {"mcc", "accuracy"}}[task]
    assert set(teacher) == set(student) == expected
    main_metric = "pearson" if task == "stsb" else "mcc"
    assert teacher[main_metric] > 0.5  # the label follows the opinion word of sentence 1
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "s")
    assert config.num_labels == (1 if task == "stsb" else 2)


def test_compare_runs_every_strategy_and_skips_finished_runs(tiny_model_dir, sst_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        tiny_model_dir,
        "--task",
        "sst2",
        "--data-dir",
        sst_dir,
        "--output-dir",
        out,
        "--teacher-epochs",
        "3",
        "--teacher-lr",
        "3e-3",
        "--max-steps",
        "8",
        "--lr",
        "3e-3",
        "--sparsities",
        "0.5,0.9",
        "--prune-updates",
        "4",
        *FAST,
    ]
    assert cli(*args) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {(r["strategy"], r["sparsity"]): r for r in results["runs"]}
    strategies = {"sparsebert", "prune-then-finetune", "finetune-then-prune", "finetune-then-prune-kd", "distill-dense"}
    assert set(runs) == {(s, p) for s in strategies for p in (0.5, 0.9)}
    total = runs[("sparsebert", 0.5)]["nonzero_params"] * 2  # half of the prunable weights remain at 50%
    for (strategy, sparsity), run in runs.items():
        assert run["train_loss_curve"] and set(run["metrics"]) == {"accuracy"}
        if strategy != "distill-dense":
            assert run["nonzero_params"] == pytest.approx((1 - sparsity) * total, rel=0.01)
        else:  # a dense student sized to the same budget (layers dropped, then narrowed): exactly that shape
            from transformers import AutoConfig

            from sparsebert.students import dense_shape

            layers, hidden, _, ffn = dense_shape(AutoConfig.from_pretrained(tiny_model_dir), sparsity)
            assert run["nonzero_params"] == layers * (4 * hidden**2 + 2 * hidden * ffn)
    assert (out / "metric_vs_sparsity.png").stat().st_size > 0 and (out / "train_loss.png").stat().st_size > 0
    assert (out / "results.csv").read_text().count("\n") == 1 + 1 + 10
    # a restart with --resume skips what is finished: nothing is retrained (without it, the folder is refused)
    stamp = (out / "sparsebert-0.9" / "model.safetensors").stat().st_mtime
    assert cli(*args) == 2
    assert cli(*args, "--resume") == 0
    assert (out / "sparsebert-0.9" / "model.safetensors").stat().st_mtime == stamp


def test_evaluate_accepts_a_compressed_folder(teacher, sst_dir, tmp_path):
    from sparsebert.export import export_compressed

    export_compressed(teacher, tmp_path / "csr")
    assert not (tmp_path / "csr" / "model.safetensors").exists()
    args = ["--task", "sst2", "--data-dir", sst_dir, "--max-seq-length", "16"]
    assert cli("evaluate", "--model", tmp_path / "csr", *args, "--output", tmp_path / "a.json") == 0
    assert cli("evaluate", "--model", teacher, *args, "--output", tmp_path / "b.json") == 0
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_distill_dense_takes_a_smaller_pretrained_student(teacher, tiny_model_dir, sst_dir, tmp_path, capsys):
    from transformers import BertModel

    small = BertModel.from_pretrained(tiny_model_dir)
    small.encoder.layer = small.encoder.layer[1:]  # a 1-layer "pre-trained" model (minilm-l3 is the real one)
    small.config.num_hidden_layers = 1
    small.save_pretrained(tmp_path / "small")
    args = ["prune", "--teacher", teacher, "--task", "sst2", "--data-dir", sst_dir, "--strategy", "distill-dense"]
    args += ["--sparsity", "0.5", "--max-steps", "2", *FAST]
    assert cli(*args, "--student", tmp_path / "small", "--output-dir", tmp_path / "d") == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (1, 32)  # 1 of 2 layers fits 50%: used as is

    small.resize_token_embeddings(small.config.vocab_size + 5)
    small.save_pretrained(tmp_path / "other-vocab")
    assert cli(*args, "--student", tmp_path / "other-vocab", "--output-dir", tmp_path / "e") == 2
    assert "share the teacher's tokenizer" in capsys.readouterr().err


def test_prune_with_augmented_data(teacher, sst_dir, tmp_path, monkeypatch):
    """--augment N trains on the originals followed by N varied copies of each: words replaced by their
    neighbours in the model's embeddings, labels kept, the same variants for the same seed."""
    from sparsebert import api

    real, inputs, seen = api.augment, [], []
    monkeypatch.setattr(api, "augment", lambda *a, **kw: inputs.append(a[0]) or seen.append(real(*a, **kw)) or seen[-1])
    args = ["prune", "--teacher", teacher, "--student", teacher, "--task", "sst2", "--data-dir", sst_dir]
    for name in ("a", "b"):
        assert cli(*args, "--augment", "2", "--max-steps", "2", "--output-dir", tmp_path / name, *FAST) == 0
    originals = inputs[0]
    assert len(originals) == len((sst_dir / "train.tsv").read_text().splitlines()) - 1
    config = next(r for r in JsonlLog(tmp_path / "a" / "log.jsonl").read() if r.get("event") == "config")
    assert config["train_examples"] == 3 * len(originals) == len(seen[0])
    assert seen[0] == seen[1]  # seeded
    assert seen[0][: len(originals)] == originals
    variants = seen[0][len(originals) :]
    assert [v.label for v in variants] == [e.label for e in originals] * 2
    changed = sum(v.texts != e.texts for v, e in zip(variants, originals * 2, strict=True))
    assert changed >= 0.5 * len(variants)  # replacement probability 0.4 per word, most sentences change
    assert cli(*args, "--augment", "-1", "--output-dir", tmp_path / "c") == 2


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from sparsebert import hardware

    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(hardware, "native_bf16", lambda device_type, native=native: native)
        assert hardware.resolve_mixed_precision("auto") == expected
    assert hardware.resolve_mixed_precision("no") == "no" and hardware.resolve_mixed_precision("bf16") == "bf16"


def test_bf16_on_a_cpu_runs_eager_attention_and_saves_none(tiny_model_dir, tmp_path):
    """Torch's fused CPU attention is ~3x slower in bf16 than in fp32: bf16 on a CPU switches the model to
    eager attention, nothing else switches it, and the choice does not travel with the saved model."""
    from transformers import AutoModelForSequenceClassification

    from sparsebert.models import fast_attention

    for precision, device, eager in (("bf16", "cpu", True), ("no", "cpu", False), ("bf16", "cuda", False)):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        own = model.config._attn_implementation
        assert own != "eager"
        assert fast_attention(model, precision, device).config._attn_implementation == ("eager" if eager else own)
    model = fast_attention(model, "bf16", torch.device("cpu"))
    model.save_pretrained(tmp_path)
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))


@pytest.mark.parametrize("precision", ["auto", "bf16", "no"])
def test_prune_in_the_chosen_precision_saves_fp32(precision, teacher, tiny_model_dir, sst_dir, tmp_path, monkeypatch):
    """bf16 (forced here, emulated on CPUs without it) runs the teacher and the student under autocast,
    the losses in fp32, and saves fp32 weights; ``auto`` writes what it chose into config.yaml and the log.
    In bf16 on a CPU the student's training steps and the teacher's (and dev) run eager attention, in fp32
    none does."""
    from transformers.models.bert import modeling_bert

    from sparsebert.hardware import resolve_mixed_precision

    eager_calls = []  # True: with grad (the student training), False: without (the teacher, dev)
    eager = modeling_bert.eager_attention_forward
    monkeypatch.setattr(
        modeling_bert,
        "eager_attention_forward",
        lambda *a, **k: eager_calls.append(torch.is_grad_enabled()) or eager(*a, **k),
    )
    out = tmp_path / precision
    args = ["--task", "sst2", "--data-dir", sst_dir, "--output-dir", out, "--max-steps", "6", *FAST]
    code = cli(
        "prune", "--teacher", teacher, "--student", tiny_model_dir, "--sparsity", "0.5", *args,
        "--mixed-precision", precision,
    )  # fmt: skip
    assert code == 0
    chosen = resolve_mixed_precision(precision)
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == chosen
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert next(r for r in log if r.get("event") == "start")["mixed_precision"] == chosen
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    weights = _weights(out)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(0.5, abs=1e-3)
    steps_x_layers = 6 * AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    if chosen == "bf16":
        assert eager_calls.count(True) >= steps_x_layers and eager_calls.count(False) >= steps_x_layers
    else:
        assert not eager_calls


def test_every_job_returns_a_run_result(teacher, sst_dir, tmp_path):
    """evaluate (like finetune, prune, compress and compare) returns api.RunResult: its metrics, the file
    it wrote, and the metrics.json record in ``details``."""
    from sparsebert import api
    from sparsebert.config import EvaluateConfig

    config = EvaluateConfig.of(model=teacher, task="sst2", data_dir=str(sst_dir), output=str(tmp_path / "m.json"))
    result = api.evaluate(config)
    assert isinstance(result, api.RunResult) and result.output_dir == tmp_path / "m.json"
    assert result.details == json.loads((tmp_path / "m.json").read_text())
    assert result.metrics == result.details["metrics"] and set(result.metrics) == {"accuracy"}
    assert result.seconds > 0


def test_prune_with_a_pattern_saves_it_exactly(teacher, tiny_model_dir, sst_dir, tmp_path):
    """``--prune-pattern 2:4`` alone sets the target (50%), and the saved weights hold the pattern."""
    import yaml

    out = tmp_path / "s"
    data = ["--task", "sst2", "--data-dir", sst_dir]
    assert cli("prune", "--teacher", teacher, "--student", tiny_model_dir, *data, "--prune-pattern", "2:4",
               "--max-steps", "8", "--prune-updates", "4", *FAST, "--output-dir", out) == 0  # fmt: skip
    assert yaml.safe_load((out / "config.yaml").read_text())["sparsity"] == 0.5
    matrices = {n: w for n, w in _weights(out).items() if "encoder.layer" in n and w.ndim == 2}
    assert len(matrices) == 12  # six per layer
    for name, w in matrices.items():
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(dim=-1) == 2).all(), name
    assert cli("prune", "--teacher", teacher, "--student", tiny_model_dir, *data, "--prune-pattern", "2:4",
               "--sparsity", "0.4", "--output-dir", tmp_path / "no") == 2  # fmt: skip
