"""--report-to tensorboard: accelerate's tracker writes the log's series (loss terms, LR, sparsity, dev
metrics) as a TensorBoard event file under the run's folder, read back here record by record."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import cli

pytest.importorskip("tensorboardX")  # the optional extra (installed by make install's dev extra)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``folder``: TFRecord framing (length, CRC, data, CRC)."""
    from tensorboardX.proto import event_pb2

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def test_a_tiny_prune_run_writes_loss_sparsity_and_dev_series(tiny_model_dir, sst_dir, tmp_path):
    fast = ["--max-seq-length", "16", "--batch-size", "16", "--eval-batch-size", "32"]
    data = ["--task", "sst2", "--data-dir", sst_dir, *fast]
    teacher = tmp_path / "teacher"
    assert cli("finetune", "--model", tiny_model_dir, *data, "--max-steps", "2", "--output-dir", teacher) == 0
    out = tmp_path / "student"
    args = ["prune", "--teacher", teacher, "--student", tiny_model_dir, *data, "--sparsity", "0.6", "--max-steps", "6",
            "--prune-updates", "3", "--log-every", "2", "--eval-every", "3", "--report-to", "tensorboard"]  # fmt: skip
    assert cli(*args, "--output-dir", out) == 0
    series = read_scalars(out / "sparsebert")
    assert [step for step, _ in series["loss"]] == [2, 4, 6]
    assert {"loss_attention", "loss_hidden", "loss_prediction", "lr", "target_sparsity"} <= set(series)
    assert series["target_sparsity"][-1] == (6, pytest.approx(0.6))
    assert [step for step, _ in series["dev/accuracy"]] == [3, 6]  # every evaluation, the final one too
    assert not (teacher / "sparsebert").exists()  # the default is none
