"""HF BERT weights from an ONNX export of a ``BertModel``: the way back from a graph to a checkpoint.

Some pre-trained encoders ship only as ONNX (the 3-layer MiniLM in ``../shared/MODELS.md``). The
exporter keeps the names of embeddings, biases and LayerNorms but renames every linear weight to an
anonymous ``onnx::MatMul_N``, stored transposed. Their order in the file is not a contract, so each
weight is named by the graph instead: a ``MatMul`` with a constant right operand feeds an ``Add``
whose other operand is a named bias, and ``<layer>.bias`` names ``<layer>.weight``. The result is
checked against the graph's own output by onnxruntime before anyone trains on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from sparsebert.errors import SparseBertError

_BERT_NAME = re.compile(r"(embeddings|encoder)\.")


def _hf_name(onnx_name: str) -> str | None:
    """``model.0.auto_model.encoder.layer.0...`` -> ``encoder.layer.0...`` (the BertModel's own name)."""
    match = _BERT_NAME.search(onnx_name)
    return onnx_name[match.start() :] if match else None


def bert_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The ``BertModel`` state dict held by an ONNX graph (embeddings and encoder; no pooler)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    constants = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, torch.Tensor] = {}
    for name, tensor in constants.items():
        hf = _hf_name(name)
        if hf is not None:
            state[hf] = torch.from_numpy(numpy_helper.to_array(tensor).copy())
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in constants:
            continue
        biases = [
            i
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for i in add.input
            if i in constants and i.endswith(".bias")
        ]
        hf = _hf_name(biases[0]) if len(biases) == 1 else None
        if hf is None:
            raise SparseBertError(f"{onnx_path}: cannot tell which layer MatMul weight {node.input[1]} belongs to")
        weight = numpy_helper.to_array(constants[node.input[1]])
        state[hf[: -len("bias")] + "weight"] = torch.from_numpy(np.ascontiguousarray(weight.T))  # (in,out)->(out,in)
    return state


def layer_count(state: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if indices != set(range(len(indices))) or not indices:
        raise SparseBertError(f"encoder layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def check_against_graph(model: torch.nn.Module, onnx_path: Path, atol: float = 1e-4) -> float:
    """Max |HF last hidden state - the graph's| on a probe batch with padding; raises above ``atol``.

    The graph's hidden state is its one float output of rank 3 (batch, tokens, hidden).
    """
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hidden = [o.name for o in session.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 3]
    if len(hidden) != 1:
        raise SparseBertError(f"{onnx_path}: expected one (batch, tokens, hidden) output, found {hidden}")
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    (expected,) = session.run(hidden, {i.name: feeds[i.name] for i in session.get_inputs()})
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    keep = mask.numpy().astype(bool)  # padded positions are not defined to agree
    error = float(np.abs(got[keep] - expected[keep]).max())
    if error > atol:
        raise SparseBertError(f"{onnx_path}: converted weights differ from the graph by {error:.2e} (> {atol})")
    return error
