"""Small dense students for the comparison the paper makes (TinyBERT/MiniLM/DistilBERT-style).

A dense student is a copy of the pre-trained model with fewer layers (uniformly chosen, as in the
distillation layer map) and, when dropping layers is not enough, a narrower width (the first hidden
units, heads and FFN units are kept). It is sized so its encoder linears hold as many weights as the
sparse model keeps at a given sparsity: the "same number of nonzero weights" comparison.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from sparsebert.distill import layer_map
from sparsebert.errors import SparseBertError
from sparsebert.layers import find_encoder_layers, find_prunable_linears


def linear_weights(config) -> int:
    """Weights in one encoder layer's six projections."""
    return 4 * config.hidden_size**2 + 2 * config.hidden_size * config.intermediate_size


def dense_shape(config, sparsity: float) -> tuple[int, int, int, int]:
    """(layers, hidden, heads, intermediate) of a dense student matching ``sparsity``'s nonzeros."""
    budget = (1 - sparsity) * encoder_linear_weights(config)
    layers = max(1, min(config.num_hidden_layers, math.ceil((1 - sparsity) * config.num_hidden_layers - 1e-9)))
    scale = min(1.0, math.sqrt(budget / (layers * linear_weights(config))))
    head_dim = config.hidden_size // config.num_attention_heads
    heads = max(1, round(scale * config.num_attention_heads))
    intermediate = max(1, round(scale * config.intermediate_size))
    return layers, heads * head_dim, heads, intermediate


def encoder_linear_weights(config) -> int:
    """Weights in all the encoder's projections: the size a dense student is budgeted against."""
    return config.num_hidden_layers * linear_weights(config)


def fit_dense_student(student: nn.Module, reference_config, sparsity: float) -> nn.Module:
    """``student`` cut down to ``(1 - sparsity)`` of the reference model's encoder weights.

    The budget is the sparse model's nonzero count, so any pre-trained student can be compared at
    a sparsity: the model itself (cut down), or a smaller one such as minilm-l3, used as it is when
    it already fits (3 of 6 layers = the budget at 50%) and cut down further when it does not.
    """
    budget = (1 - sparsity) * encoder_linear_weights(reference_config)
    own = encoder_linear_weights(student.config)
    if own <= budget * (1 + 1e-9):
        return student
    return make_dense_student(student, 1 - budget / own)


def make_dense_student(model: nn.Module, sparsity: float) -> nn.Module:
    """A layer-dropped, narrowed copy of ``model`` (its pre-trained weights, sliced)."""
    config = model.config
    if getattr(config, "model_type", None) not in ("bert", "roberta", "electra", "mpnet"):
        raise SparseBertError(
            f"dense students are built for BERT, RoBERTa, ELECTRA and MPNet configs, not {config.model_type}"
        )
    layers, hidden, heads, intermediate = dense_shape(config, sparsity)
    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers, new_config.hidden_size = layers, hidden
    new_config.num_attention_heads, new_config.intermediate_size = heads, intermediate
    if getattr(config, "embedding_size", None) == config.hidden_size:
        new_config.embedding_size = hidden
    student = type(model)(new_config)

    kept = layer_map(layers, config.num_hidden_layers)  # the layers the student is distilled from
    stack_name, _ = find_encoder_layers(student)
    source = model.state_dict()
    state = {}
    for name, value in student.state_dict().items():
        src_name = name
        if name.startswith(stack_name + "."):
            rest = name[len(stack_name) + 1 :]
            i, tail = rest.split(".", 1)
            src_name = f"{stack_name}.{kept[int(i)]}.{tail}"
        src = source[src_name]
        if src.ndim != value.ndim or any(a < b for a, b in zip(src.shape, value.shape, strict=True)):
            raise SparseBertError(f"cannot slice {src_name} {tuple(src.shape)} to {tuple(value.shape)}")
        state[name] = src[tuple(slice(0, n) for n in value.shape)].clone()  # the leading units
    student.load_state_dict(state)
    return student


def nonzero_linear_weights(model: nn.Module) -> int:
    """Nonzero weights in the encoder's prunable projections (the paper's "remaining" count)."""
    return sum(int((t.module.weight != 0).sum()) for t in find_prunable_linears(model))
