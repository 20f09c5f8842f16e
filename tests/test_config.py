"""One declaration per option: the dataclasses are the API, the YAML recipes and the command line."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sparsebert import config as configs
from sparsebert.cli import COMMANDS, build_parser, config_class
from sparsebert.options import build_config, flat_options, group, opt, option_fields
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
    fields = {name: f for name, (_, f, _) in option_fields(CLASSES[command]).items()}
    assert dests == set(fields)
    assert all(f.metadata.get("help") for f in fields.values()), command


@pytest.mark.parametrize("command", ["finetune", "prune", "compress", "compare", "evaluate"])
def test_a_recipe_of_every_default_round_trips(command, tmp_path):
    cls = CLASSES[command]
    defaults = flat_options(cls())
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(defaults))
    assert build_config(cls, tmp_path / "r.yaml") == cls()


def test_flags_override_the_recipe_and_lists_take_commas(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: 0.001\nsparsities: [0.5]\ngroup_by_length: false\n")
    args = build_parser().parse_args(["compare", "--config", str(tmp_path / "r.yaml"), "--sparsities", "0.8,0.9"])
    options = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    config = build_config(configs.CompareConfig, args.config, **options)
    assert (config.training.lr, config.compare.sparsities, config.training.group_by_length) == (
        0.001,
        [0.8, 0.9],
        False,
    )


def test_the_student_schedule_is_prunes_own_and_the_teacher_keeps_fine_tunings(tmp_path):
    """A student is pruned at a higher LR than a fine-tuning (BENCHMARKS.md, "A higher learning rate"); in
    ``compress`` ``--lr``/``--warmup-ratio``/``--lr-schedule`` are the student's, the teacher has its own."""
    from sparsebert.pipeline import stage_configs

    def schedule(config):
        return config.training.lr, config.training.warmup_ratio, config.training.lr_schedule

    fine, prune = configs.FinetuneConfig(), configs.PruneConfig()
    assert schedule(fine) == (5e-5, 0.1, "linear")
    assert schedule(prune) == (3e-4, 0.02, "linear")
    config = configs.CompressConfig.of(warmup_ratio=0.05, lr_schedule="constant", teacher_lr=2e-5, batch_size=8)
    teacher, student = stage_configs(config, tmp_path)
    assert schedule(teacher) == (2e-5, 0.1, "linear")
    assert schedule(student) == (3e-4, 0.05, "constant")
    assert teacher.training.batch_size == student.training.batch_size == 8  # the rest is shared
    assert teacher.data is not student.data  # a stage resolving its length does not touch the other's


def test_each_option_is_declared_once_and_the_help_shows_the_commands_default():
    """``--lr`` is one option of the training group; prune's help shows the student's default."""
    owners = {name: g for name, (g, _, _) in option_fields(configs.CompressConfig).items()}
    assert (owners["lr"], owners["teacher_lr"], owners["sparsity"], owners["task"]) == (
        "training", "teacher", "pruning", "data")  # fmt: skip
    helps = {
        command: next(a.help for a in _subparsers()[command]._actions if a.dest == "lr")
        for command in ("finetune", "prune")
    }
    assert "default: 5e-05" in helps["finetune"] and "default: 0.0003" in helps["prune"]
    assert helps["finetune"].split(" (default")[0] == helps["prune"].split(" (default")[0]  # one declaration


def test_an_option_declared_in_two_groups_is_refused():
    @dataclasses.dataclass
    class A:
        lr: float = opt(1.0, "a")

    @dataclasses.dataclass
    class B:
        lr: float = opt(2.0, "b")

    @dataclasses.dataclass
    class Both:
        a: A = group(A)
        b: B = group(B)

    with pytest.raises(TypeError, match="lr declared in groups a and b"):
        option_fields(Both)


def test_each_group_checks_its_values_and_the_saved_options_stay_flat(tmp_path):
    from sparsebert.errors import SparseBertError

    with pytest.raises(SparseBertError, match="--batch-size must be >= 1"):
        configs.PruneConfig.of(batch_size=0)
    with pytest.raises(SparseBertError, match="--prune-scope must be one of"):
        build_config(configs.PruneConfig, prune_scope="rows")
    config = configs.PruneConfig.of(task="rte", sparsity=0.95, lr=1e-4)
    saved = yaml.safe_load(__import__("sparsebert.options", fromlist=["to_yaml"]).to_yaml(config))
    assert (saved["task"], saved["sparsity"], saved["lr"], saved["max_seq_length"]) == ("rte", 0.95, 1e-4, 128)
    assert build_config(configs.PruneConfig, base=saved) == config  # what --resume reads back
    assert configs.PruneConfig.of(output_dir=tmp_path).run.output_dir == str(tmp_path)  # a Path is a folder name
