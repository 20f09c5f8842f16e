"""The compressed format: round trips, sizes, tied weights, plain HF folders, and the CLI handler."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig

from sparsebert.errors import SparseBertError
from sparsebert.export import MANIFEST, export_compressed, load
from sparsebert.layers import find_prunable_linears
from sparsebert.pruning import Pruner
from sparsebert.runtime.commands import register_commands


def pruned(config, sparsity: float, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    Pruner.one_shot(model, sparsity)
    return model


def bert_config(**kw) -> BertConfig:
    base = dict(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertConfig(**{**base, **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "config", [bert_config(), DistilBertConfig(vocab_size=60, dim=64, n_layers=2, n_heads=4, hidden_dim=128)]
)
def test_fp32_round_trip_is_exact(tmp_path, config):
    model = pruned(config, 0.95)
    model.save_pretrained(tmp_path / "src")
    report = export_compressed(tmp_path / "src", tmp_path / "out")
    assert report.sparse_matrices == 12 and report.dense_matrices_kept == 0
    back = load(tmp_path / "out")
    assert type(back) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 60, (2, 9))
    assert torch.equal(logits(model, ids), logits(back, ids))


def test_sizes_meet_the_targets_at_95_percent(tmp_path):
    model = pruned(bert_config(hidden_size=128, intermediate_size=512), 0.95)
    r32 = export_compressed(model, tmp_path / "fp32", values="fp32")
    r16 = export_compressed(model, tmp_path / "fp16", values="fp16")
    assert r32.pruned_ratio >= 12 and r16.pruned_ratio >= 18
    assert r32.pruned_dense_fp32_bytes == sum(4 * t.module.weight.numel() for t in find_prunable_linears(model))
    manifest = json.loads((tmp_path / "fp16" / MANIFEST).read_text())
    assert manifest["values"] == "fp16" and len(manifest["sparse"]) == 12
    stored = load_file(tmp_path / "fp16" / "sparse.safetensors")
    assert all(t.dtype == torch.float16 for k, t in stored.items() if k.endswith(".values"))
    assert all(t.dtype == torch.int16 for k, t in stored.items() if k.endswith(".indices"))


def test_fp16_values_stay_close(tmp_path):
    model = pruned(bert_config(), 0.9)
    export_compressed(model, tmp_path / "o", values="fp16")
    back = load(tmp_path / "o")
    ids = torch.randint(0, 60, (2, 9))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-2, atol=1e-3)
    w, w2 = (
        model.bert.encoder.layer[0].attention.self.query.weight,
        back.bert.encoder.layer[0].attention.self.query.weight,
    )
    assert torch.equal(w == 0, w2 == 0)


def test_bf16_values_are_the_weights_the_bf16_engine_computes_with(tmp_path):
    """Stored as bf16, read back as the bf16-rounded weights (zeros where the model had them), so the bf16
    engine gives the same outputs from this file as from the fp32 one."""
    model = pruned(bert_config(), 0.9)
    export_compressed(model, tmp_path / "o", values="bf16")
    stored = load_file(tmp_path / "o" / "sparse.safetensors")
    assert all(t.dtype == torch.bfloat16 for k, t in stored.items() if k.endswith(".values"))
    w = model.bert.encoder.layer[0].output.dense.weight
    back = load(tmp_path / "o").bert.encoder.layer[0].output.dense.weight
    assert torch.equal(back, w.bfloat16().float())


def test_empty_rows_and_fully_pruned_matrix(tmp_path):
    model = pruned(bert_config(), 0.9)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.zero_()
        model.bert.encoder.layer[1].output.dense.weight[:7] = 0
    export_compressed(model, tmp_path / "o")
    back = load(tmp_path / "o")
    assert not back.bert.encoder.layer[0].intermediate.dense.weight.any()
    assert torch.equal(back.bert.encoder.layer[1].output.dense.weight, model.bert.encoder.layer[1].output.dense.weight)


def test_dense_matrices_below_min_sparsity_stay_dense(tmp_path):
    model = pruned(bert_config(), 0.3)
    report = export_compressed(model, tmp_path / "o", min_sparsity=0.5)
    assert report.sparse_matrices == 0 and report.dense_matrices_kept == 12
    assert torch.equal(load(tmp_path / "o").state_dict()["classifier.weight"], model.state_dict()["classifier.weight"])


def test_tied_weights_are_stored_once(tmp_path):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(tie_word_embeddings=True)).eval()
    export_compressed(model, tmp_path / "o")
    back = load(tmp_path / "o")
    assert back.cls.predictions.decoder.weight.data_ptr() == back.bert.embeddings.word_embeddings.weight.data_ptr()
    ids = torch.randint(0, 60, (1, 7))
    assert torch.equal(logits(back, ids), logits(model, ids))


def test_load_accepts_an_ordinary_hf_folder(tmp_path):
    model = pruned(bert_config(), 0.5)
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 60, (1, 5))
    assert torch.equal(logits(load(tmp_path / "hf"), ids), logits(model, ids))


def test_refuses_non_empty_output_and_bad_values(tmp_path):
    model = pruned(bert_config(), 0.5)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    with pytest.raises(SparseBertError, match="not empty"):
        export_compressed(model, tmp_path / "o")
    with pytest.raises(SparseBertError, match="values"):
        export_compressed(model, tmp_path / "p", values="int4")


def test_export_command_copies_tokenizer_and_reports(tmp_path, tiny_model_dir, capsys):
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "export",
            "--model",
            str(tiny_model_dir),
            "--output-dir",
            str(tmp_path / "o"),
            "--values",
            "fp16",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.handler(args) == 0
    assert (tmp_path / "o" / "vocab.txt").exists() and (tmp_path / "o" / MANIFEST).exists()
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert "pruned layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["values"] == "fp16"


def test_a_compressed_folder_is_loaded_for_a_task_with_the_same_head_checks(tmp_path):
    """models.load_model accepts the compressed format like an ordinary folder, and refuses a head of the
    wrong size for the task in both."""
    from sparsebert.models import load_model
    from sparsebert.tasks import get_task

    export_compressed(pruned(bert_config(), 0.9), tmp_path / "c")
    model = load_model(tmp_path / "c", get_task("mrpc"))
    assert model.config.num_labels == 2 and model.classifier.out_features == 2
    with pytest.raises(SparseBertError, match="head for 2 labels but task stsb has 1"):
        load_model(tmp_path / "c", get_task("stsb"))
