"""One declaration per option: the dataclasses are the API, the YAML recipes and the command line."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sparsebert import config as configs
from sparsebert.cli import COMMANDS, build_parser, config_class
from sparsebert.options import build_config
from sparsebert.runtime.commands import BenchConfig, ExportConfig, OnnxConfig

CLASSES = {
    **{name: config_class(name) for name in COMMANDS},
    "export": ExportConfig,
    "bench": BenchConfig,
    "onnx": OnnxConfig,
}


def _subparsers():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("command", list(CLASSES))
def test_every_option_has_exactly_one_flag_with_help(command):
    sub = _subparsers()[command]
    dests = {a.dest for a in sub._actions} - {"help", "config", "handler"}
    fields = {f.name: f for f in dataclasses.fields(CLASSES[command])}
    assert dests == set(fields)
    assert all(f.metadata.get("help") for f in fields.values()), command


@pytest.mark.parametrize("command", ["finetune", "prune", "compress", "compare", "evaluate"])
def test_a_recipe_of_every_default_round_trips(command, tmp_path):
    cls = CLASSES[command]
    defaults = dataclasses.asdict(cls())
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(defaults))
    assert dataclasses.asdict(build_config(cls, tmp_path / "r.yaml")) == defaults


def test_flags_override_the_recipe_and_lists_take_commas(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: 0.001\nsparsities: [0.5]\ngroup_by_length: false\n")
    args = build_parser().parse_args(["compare", "--config", str(tmp_path / "r.yaml"), "--sparsities", "0.8,0.9"])
    options = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    config = build_config(configs.CompareConfig, args.config, **options)
    assert (config.lr, config.sparsities, config.group_by_length) == (0.001, [0.8, 0.9], False)


def test_the_student_schedule_is_prunes_own_and_the_teacher_keeps_fine_tunings(tmp_path):
    """A student is pruned at a higher LR than a fine-tuning (BENCHMARKS.md, "A higher learning rate"); in
    ``compress`` ``--lr``/``--warmup-ratio``/``--lr-schedule`` are the student's, the teacher has its own."""
    from sparsebert.pipeline import stage_configs

    fine, prune = configs.FinetuneConfig(), configs.PruneConfig()
    assert (fine.lr, fine.warmup_ratio, fine.lr_schedule) == (5e-5, 0.1, "linear")
    assert (prune.lr, prune.warmup_ratio, prune.lr_schedule) == (3e-4, 0.02, "linear")
    config = configs.CompressConfig(warmup_ratio=0.05, lr_schedule="constant", teacher_lr=2e-5)
    teacher, student = stage_configs(config, tmp_path)
    assert (teacher.lr, teacher.warmup_ratio, teacher.lr_schedule) == (2e-5, 0.1, "linear")
    assert (student.lr, student.warmup_ratio, student.lr_schedule) == (3e-4, 0.05, "constant")
