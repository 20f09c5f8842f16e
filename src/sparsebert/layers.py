"""The one layer map: which linear projections of a BERT-family encoder are prunable, and what each does.

It is the single declaration of those projections, read by the pruner, distillation, the compressed export
and the sparse runtime alike; a leaf (torch and ``sparsebert.errors`` only), so that serving a model does
not import the pruning package to find its layers.

Found by architecture rather than by parameter names: every BERT-family encoder layer (BERT, RoBERTa,
DistilBERT, ELECTRA, MiniLM, ...) holds exactly six ``nn.Linear`` modules in its self-attention and
feed-forward blocks, registered in the same order: query, key, value, attention output, FFN up, FFN down.
We locate the stack of encoder layers as the ``nn.ModuleList`` whose length equals the config's number of
layers, and then assign the six roles by registration order, checking the shapes (four hidden->hidden maps,
then hidden->intermediate and intermediate->hidden). Anything that does not fit that pattern is reported
instead of silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsebert.errors import SparseBertError

ROLES = ("query", "key", "value", "attn_output", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class PrunableLinear:
    """One prunable projection: where it lives and what it does."""

    name: str  # fully qualified module name, e.g. "bert.encoder.layer.3.attention.self.query"
    layer: int  # index of the encoder layer
    role: str  # one of ROLES
    module: nn.Linear


def find_encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the transformer block stack."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if n_layers is not None and len(module) != n_layers:
            continue
        if all(sum(isinstance(m, nn.Linear) for m in block.modules()) >= 6 for block in module):
            candidates.append((name, module))
    if not candidates:
        raise SparseBertError(
            f"could not find the encoder layers of {type(model).__name__}: expected a ModuleList of "
            f"{n_layers} transformer blocks with at least six nn.Linear each"
        )
    # The outermost match is the encoder stack (an inner ModuleList would be a sub-block).
    return min(candidates, key=lambda c: c[0].count("."))


def _assign_roles(block: nn.Module, block_name: str, layer: int) -> list[PrunableLinear]:
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) == 6:
        q, k, v, o, up, down = (m for _, m in linears)
        hidden = q.in_features
        square = all(m.in_features == hidden and m.out_features == hidden for m in (q, k, v, o))
        ffn = up.in_features == hidden and down.in_features == up.out_features and down.out_features == hidden
        if square and ffn:
            return [
                PrunableLinear(f"{block_name}.{n}", layer, role, m) for role, (n, m) in zip(ROLES, linears, strict=True)
            ]
    shapes = ", ".join(f"{n}: {m.in_features}->{m.out_features}" for n, m in linears)
    raise SparseBertError(
        f"layer {layer} ({block_name}) does not look like a BERT block: expected six linears "
        f"(query, key, value, attention output, FFN up, FFN down), found [{shapes}]"
    )


def find_prunable_linears(model: nn.Module) -> list[PrunableLinear]:
    """All six projections of every encoder layer, in layer order then ROLES order."""
    stack_name, stack = find_encoder_layers(model)
    found: list[PrunableLinear] = []
    for i, block in enumerate(stack):
        found.extend(_assign_roles(block, f"{stack_name}.{i}", i))
    return found
