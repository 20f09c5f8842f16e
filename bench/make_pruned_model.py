"""Write a magnitude-pruned model folder to feed `sparsebert export` / `sparsebert bench --model`.

``--model bert-base`` is a randomly initialised BertModel of BERT-base shape (BertConfig() defaults); any
other name is real weights: ``minilm-l6``, ``mpnet-base`` or a model folder (a fine-tuned one keeps its task
head). Pruned per matrix by magnitude, without any fine-tuning, so each matrix has the density of a
student pruned per matrix: this is for size and speed measurements, not accuracy.

    .venv/bin/python bench/make_pruned_model.py --model minilm-l6 --sparsity 0.95 --output-dir /tmp/minilm-95
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from sparsebert.pruning import Pruner, sparsity_report
from sparsebert.runtime.bench import random_pruned_model
from sparsebert.sources import resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bert-base (random weights), or a model name or folder")
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--output-dir", required=True)
    args = p.parse_args()
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    if args.model == "bert-base":
        model = random_pruned_model("bert-base", args.sparsity)
    else:
        source = resolve_model(args.model)
        heads = AutoConfig.from_pretrained(source).architectures or []
        auto = AutoModelForSequenceClassification if any("SequenceClassification" in a for a in heads) else AutoModel
        model = auto.from_pretrained(source).eval()
        Pruner.one_shot(model, args.sparsity)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    model.save_pretrained(out)
    print(f"{args.model} pruned to {100 * sparsity_report(model)['overall']:.2f}% -> {out}")


if __name__ == "__main__":
    main()
