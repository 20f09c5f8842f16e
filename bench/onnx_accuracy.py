"""Dev-set accuracy of a pruned classifier: PyTorch vs its ONNX export vs ONNX int8 (dynamic quantization).

    .venv/bin/python bench/onnx_accuracy.py --model runs/demo/student --task movie-sentiment --out /tmp/onnx

Sentence pairs work too: for BERT-style models the graph also takes token_type_ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sparsebert.api import _load_data
from sparsebert.config import EvaluateConfig
from sparsebert.export import load
from sparsebert.metrics import compute_metrics
from sparsebert.models import load_tokenizer
from sparsebert.runtime.onnx_export import export_onnx, uses_token_types


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    data = _load_data(EvaluateConfig(model=args.model, task=args.task, data_dir=args.data_dir), need_train=False)
    examples = data.dev["dev"]
    tok = load_tokenizer(args.model)
    columns = list(zip(*(e.texts for e in examples), strict=True))
    enc = tok(*columns[:2], truncation=True, max_length=args.max_seq_length, padding=True, return_tensors="np")
    labels = np.array([e.label for e in examples])
    model = load(args.model)
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if uses_token_types(model) else [])]
    feeds = {name: enc[name].astype(np.int64) for name in names}
    report = export_onnx(model, Path(args.out) / "model.onnx", seq_len=args.max_seq_length, quantize=True)
    with torch.no_grad():
        logits = {"pytorch": model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()}
    for name, path in (("onnx fp32", report["onnx_file"]), ("onnx int8", report["int8_file"])):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits[name] = np.concatenate(
            [session.run(None, {k: v[i : i + 64] for k, v in feeds.items()})[0] for i in range(0, len(labels), 64)]
        )
    results = {name: compute_metrics(data.task, lg.argmax(-1), labels) for name, lg in logits.items()}
    results["sizes_mb"] = {"onnx fp32": report["onnx_mb"], "onnx int8": report["int8_mb"]}
    results["argmax_agreement_int8_vs_pytorch"] = float(
        (logits["onnx int8"].argmax(-1) == logits["pytorch"].argmax(-1)).mean()
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
