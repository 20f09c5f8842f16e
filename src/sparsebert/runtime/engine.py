"""A feature-major encoder stack for post-LayerNorm blocks (BERT, RoBERTa, ELECTRA, MiniLM, MPNet): inference only.

The hidden states enter as (batch, tokens, hidden), are transposed once to (hidden, batch*tokens), and stay
that way through every layer: the six projections run as CSR kernels on contiguous token rows (Q, K and V
fused into one matrix), residuals and biases are fused into the kernel epilogue, and LayerNorm runs over the
feature axis. Attention runs on the feature-major Q/K/V as they are: one compiled call for every head and
sequence (scores, softmax and context fused), or torch's batched GEMMs on views of them where it cannot.
The activations live in buffers reused from one call to the next, and at the end the states are transposed
back, so the HF model's pooler and heads run unchanged. MPNet's relative-position bias (one (heads, seq,
seq) table per sequence length, the same in every layer) is added to the scores on torch's path.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from sparsebert.errors import SparseBertError
from sparsebert.runtime import ops
from sparsebert.runtime.bf16 import attention_bf16, padded, to_bf16, torch_attention_bf16
from sparsebert.runtime.kernels import attention_available, attention_fm, layer_norm_fm
from sparsebert.runtime.ops import ProjectionOp, make_projection


@dataclass
class _LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def of(cls, ln: nn.LayerNorm) -> _LayerNorm:
        return cls(ln.weight.detach().float().contiguous(), ln.bias.detach().float().contiguous(), ln.eps)

    def __call__(self, x: torch.Tensor, out_bf16: torch.Tensor | None = None) -> torch.Tensor:
        """In place (x is a scratch buffer); a bf16 copy into ``out_bf16`` too, for the bf16 engine."""
        return layer_norm_fm(x, self.weight, self.bias, self.eps, out=x, out_bf16=out_bf16)


@dataclass
class _Layer:
    qkv: ProjectionOp
    out: ProjectionOp
    up: ProjectionOp
    down: ProjectionOp
    ln_attn: _LayerNorm
    ln_out: _LayerNorm
    act: Callable[[torch.Tensor], torch.Tensor]


def _gelu_(x: torch.Tensor) -> torch.Tensor:  # a module-level function, so the encoder still pickles
    return torch.ops.aten.gelu_(x)


def _activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The FFN activation; in place for the exact GELU (BERT's default), sparing a fresh buffer per layer."""
    exact_gelu = isinstance(act, nn.GELU) and act.approximate == "none"
    return _gelu_ if exact_gelu or getattr(act, "act", None) is nn.functional.gelu else act


# Where a post-LayerNorm block keeps the parts the engine reimplements, by family: query, key, value,
# attention output, its LayerNorm, FFN up, its activation, FFN down, its LayerNorm.
PART_NAMES = ("q", "k", "v", "o", "ln_attn", "up", "act", "down", "ln_out")
LAYOUTS = {
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "intermediate.intermediate_act_fn",
             "output.dense", "output.LayerNorm"),
    "mpnet": ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "attention.LayerNorm",
              "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense", "output.LayerNorm"),
}  # fmt: skip


def block_parts(block: nn.Module) -> dict[str, nn.Module] | None:
    """The block's parts by ``PART_NAMES`` if it has one of the ``LAYOUTS`` (an encoder block, not a
    decoder's), else None."""
    if getattr(block, "is_decoder", False) or getattr(block, "add_cross_attention", False):
        return None
    for paths in LAYOUTS.values():
        parts = [_attribute(block, path) for path in paths]
        if all(isinstance(p, nn.Module) for p in parts):
            return dict(zip(PART_NAMES, parts, strict=True))
    return None


def _attribute(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def _convert_layer(block: nn.Module, max_density: float | None, backend: str) -> _Layer:
    p = block_parts(block)
    qkv_w = torch.cat([p["q"].weight, p["k"].weight, p["v"].weight]).detach()
    qkv_b = torch.cat([p["q"].bias, p["k"].bias, p["v"].bias]).detach()
    return _Layer(
        qkv=make_projection(qkv_w, qkv_b, max_density, backend),
        out=make_projection(p["o"].weight, p["o"].bias, max_density, backend),
        up=make_projection(p["up"].weight, p["up"].bias, max_density, backend),
        down=make_projection(p["down"].weight, p["down"].bias, max_density, backend),
        ln_attn=_LayerNorm.of(p["ln_attn"]),
        ln_out=_LayerNorm.of(p["ln_out"]),
        act=_activation(p["act"]),
    )


@dataclass
class _Offsets:
    """What every layer adds to its attention scores, as the path that runs takes it (``_scores_offsets``)."""

    kernel: bool  # the compiled kernel runs
    scores: torch.Tensor | None  # kernel: (batch, keys) mask rows; torch: (batch, q or 1, keys) or per head
    bias_km: torch.Tensor | None  # kernel: MPNet's (heads, keys, queries) table
    per_head: bool  # torch: scores are (batch, heads, queries, keys), the mask with MPNet's bias added


class RelativeBias:
    """MPNet's relative-position bias, (heads, seq, seq) in float32, computed once per sequence length from
    the encoder's bucket embedding and bucketing rule (the HF encoder's own ``relative_position_bucket``)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.table = encoder.relative_attention_bias.weight.detach().float().clone()
        self.bucket = encoder.relative_position_bucket
        self.num_buckets = encoder.relative_attention_bias.num_embeddings
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (heads, queries, keys) table, and the same key-major (heads, keys, queries) for the kernel."""
        if seq not in self._cache:
            positions = torch.arange(seq)
            buckets = self.bucket(positions[None, :] - positions[:, None], num_buckets=self.num_buckets)
            bias = self.table[buckets].permute(2, 0, 1).contiguous()
            self._cache = {seq: (bias, bias.transpose(1, 2).contiguous())}  # the last length only
        return self._cache[seq]


class SparseEncoder(nn.Module):
    """Drop-in replacement for a ``BertEncoder``-like module (same call signature, last_hidden_state only).

    Hidden states per layer and attention maps are not returned: the engine never materialises them in
    the HF layout. Dropout is ignored (inference only).
    """

    def __init__(self, layers: nn.ModuleList, config, max_density: float | None = None, backend: str = "auto",
                 relative_bias: RelativeBias | None = None) -> None:  # fmt: skip
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise SparseBertError("the sparse encoder supports absolute position embeddings only")
        if not all(block_parts(b) for b in layers):
            raise SparseBertError("the sparse encoder needs BERT- or MPNet-style blocks (see LAYOUTS)")
        self.relative_bias = relative_bias
        self.bf16 = backend == "bf16"  # activations between products in bf16 (``_layer_bf16``)
        self.attention_plan: dict[int, str] = {}  # bf16: "fused" or "torch" by power of two of tokens
        self.num_heads = config.num_attention_heads
        self.hidden = config.hidden_size
        self.head_dim = self.hidden // self.num_heads
        self.layers = [_convert_layer(b, max_density, backend) for b in layers]
        self._local = threading.local()

    def __getstate__(self) -> dict:  # copies and pickles leave the per-thread buffers behind
        return {**self.__dict__, "_local": None}

    def __setstate__(self, state: dict) -> None:
        state = {"bf16": False, "attention_plan": {}} | state  # pickled before the bf16 engine existed
        super().__setstate__(state)
        self._local = threading.local()

    def ops(self) -> list[ProjectionOp]:
        """The projections, layer by layer (qkv, attn_output, ffn_up, ffn_down)."""
        return [op for layer in self.layers for op in (layer.qkv, layer.out, layer.up, layer.down)]

    @staticmethod
    def _additive_mask(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """HF hands over None, a boolean (True = attend) or an additive float mask; make it (batch, q or 1, keys).

        Masked scores get the dtype's minimum rather than -inf, as HF's eager attention does, so a row with
        every key masked stays finite. A padding mask that HF expanded to one row per query (its sdpa path
        does) becomes one row again, so the fused attention kernels take it.
        """
        if mask is None:
            return None
        if mask.dim() == 2:  # a raw (batch, keys) padding mask
            mask = mask[:, None, None, :].bool()
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise SparseBertError(f"unsupported attention mask shape {tuple(mask.shape)}")
        mask = mask[:, 0]
        if mask.shape[1] > 1 and torch.equal(mask, mask[:, :1].expand_as(mask)):
            mask = mask[:, :1]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
        return mask.float()

    def _workspace(self, tokens: int) -> dict[str, torch.Tensor]:
        """The activation buffers of one forward, kept for the next one with the same token count.

        Fresh tensors of tens of MB cost a page fault per 4 KiB on first touch — as much time as the sparse
        products themselves at batch 32. One set per thread, so concurrent calls never share buffers.
        """
        ws = getattr(self._local, "ws", None)
        if ws is None or ws["x"].shape[1] != tokens:
            h, inner = self.hidden, self.layers[0].up.shape[0]
            sizes = {"x": h, "qkv": 3 * h, "ctx": h, "a": h, "u": inner}
            ws = {name: torch.empty(rows, tokens, dtype=torch.float32) for name, rows in sizes.items()}
            if self.bf16:  # one product's bf16 input at a time (x, then ctx, then a), and the FFN's
                ws |= {name: torch.empty(rows, padded(tokens), dtype=torch.bfloat16) for name, rows in
                       (("hb", h), ("qkvb", 3 * h), ("ub", inner))}  # fmt: skip
            self._local.ws = ws
        return ws

    def _scores_offsets(self, mask: torch.Tensor | None, seq: int) -> _Offsets:
        """What every layer adds to its attention scores (the mask, MPNet's relative bias), prepared once per
        call in the form the path that will run takes: the kernel's mask rows and key-major table, or for
        torch's path the mask, with the bias added once per call rather than once per layer."""
        table = None if self.relative_bias is None else self.relative_bias(seq)  # the same in every layer
        if attention_available() and (mask is None or mask.shape[1] == 1):
            rows = None if mask is None else mask[:, 0].contiguous()
            return _Offsets(True, rows, None if table is None else table[1], False)
        if table is None:
            return _Offsets(False, mask, None, False)
        return _Offsets(False, table[0][None] if mask is None else table[0][None] + mask[:, None], None, True)

    def _attention(self, qkv: torch.Tensor, batch: int, seq: int, offsets: _Offsets, ctx: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention on the feature-major Q/K/V, written into ``ctx`` (hidden, tokens).

        The compiled kernel (``kernels.attention_fm``) where it runs: AVX-512, and a mask of one row per
        sequence, as HF's encoders pass. Otherwise torch's batched GEMMs, and no activation is copied into
        the (batch, heads, tokens, dim) layout either. One sequence: Q^T, K^T and V^T are (heads, dim, seq)
        views, so all heads go in one batched call each — at batch 1 a loop over heads costs more in small
        ops than in GEMMs. Several: per head, Q^T's slice (dim, batch, seq) permuted to (batch, seq, dim) has
        one batch stride and a unit stride, which batched GEMM takes as a transposed operand; this was ~2x
        faster than ``scaled_dot_product_attention`` on permuted or copied tensors at batch 32 (BENCHMARKS.md,
        "Kernel choice"), and than batching the heads, which needs copies there (section 7). ``offsets``: the
        mask and MPNet's relative-position bias as the path takes them (``_scores_offsets``).
        """
        h, d, nh = self.hidden, self.head_dim, self.num_heads
        scale = 1.0 / math.sqrt(d)
        if offsets.kernel:
            return attention_fm(qkv, batch, nh, offsets.scores, scale, ctx, offsets.bias_km)
        if batch == 1:
            q, k, v = qkv[:h].view(nh, d, seq).transpose(1, 2), qkv[h : 2 * h].view(nh, d, seq), qkv[2 * h :]
            probs = self._softmax(q, k, offsets.scores[0] if offsets.per_head else offsets.scores, scale)
            torch.bmm(v.view(nh, d, seq), probs.transpose(1, 2), out=ctx.view(nh, d, seq))
            return ctx
        for i in range(nh):
            rows = slice(i * d, (i + 1) * d)
            q = qkv[rows].view(d, batch, seq).permute(1, 2, 0)  # (batch, seq, dim)
            k = qkv[h:][rows].view(d, batch, seq).permute(1, 0, 2)  # (batch, dim, seq)
            v = qkv[2 * h :][rows].view(d, batch, seq).permute(1, 0, 2)  # (batch, dim, seq)
            offset = offsets.scores[:, i] if offsets.per_head else offsets.scores
            out = torch.bmm(v, self._softmax(q, k, offset, scale).transpose(1, 2))  # (batch, dim, seq) = V^T P^T
            ctx[rows].view(d, batch, seq).copy_(out.permute(1, 0, 2))
        return ctx

    @staticmethod
    def _softmax(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """softmax(Q K^T * scale + mask) for batched (n, seq, dim) Q and (n, dim, seq) K^T."""
        scores = torch.bmm(q, k).mul_(scale) if mask is None else torch.baddbmm(mask, q, k, alpha=scale)
        return torch.softmax(scores, dim=-1)

    @torch.no_grad()
    def forward_features(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        dtype = hidden_states.dtype
        ws = self._workspace(batch * seq)
        x = ws["x"]
        x.copy_(hidden_states.detach().reshape(batch * seq, hidden).t())
        offsets = self._scores_offsets(self._additive_mask(attention_mask, batch), seq)
        if self.bf16:
            to_bf16(x, out=ws["hb"])  # then each layer's last LayerNorm writes the next one's
        for layer in self.layers:
            if self.bf16:
                x = self._layer_bf16(layer, x, ws, batch, seq, offsets)
                continue
            ctx = self._attention(layer.qkv(x, out=ws["qkv"]), batch, seq, offsets, ws["ctx"])
            a = layer.ln_attn(layer.out(ctx, residual=x, out=ws["a"]))
            u = layer.act(layer.up(a, out=ws["u"]))
            x = layer.ln_out(layer.down(u, residual=a, out=x))
        out = torch.empty(batch * seq, hidden, dtype=dtype)  # always fresh: x is reused by the next call
        return out.copy_(x.t()).view(batch, seq, hidden)

    def _layer_bf16(self, layer: _Layer, x: torch.Tensor, ws: dict, batch: int, seq: int, offsets: _Offsets):
        """One layer with bf16 inputs to its products: the residual stream and LayerNorm stay fp32, each
        LayerNorm writing the bf16 copy the next product reads; attention reads and writes bf16 (its softmax
        in fp32) where a fused kernel runs, else runs in fp32 between two conversions; the FFN's up projection
        writes its bf16 output through the exact GELU in the same pass (another activation runs in fp32)."""
        tokens, hb, ub = batch * seq, ws["hb"], ws["ub"]  # hb: x in bf16, from the last LayerNorm
        if offsets.kernel and self.head_dim % 2 == 0:  # attention in bf16 too: its context straight into hb
            layer.qkv.bf16(hb, tokens, out_bf16=ws["qkvb"])
            scale = 1.0 / math.sqrt(self.head_dim)
            args = (ws["qkvb"], batch, seq, self.num_heads, offsets.scores, scale, hb, offsets.bias_km)
            self._bf16_attention(tokens, args)(*args)
        else:
            layer.qkv.bf16(hb, tokens, out=ws["qkv"])
            to_bf16(self._attention(ws["qkv"], batch, seq, offsets, ws["ctx"]), out=hb)
        a = ws["a"]
        layer.out.bf16(hb, tokens, residual=x, out=a)
        layer.ln_attn(a, out_bf16=hb)
        if layer.act is _gelu_:
            layer.up.bf16(hb, tokens, out_bf16=ub, gelu=True)
        else:
            layer.up.bf16(hb, tokens, out=ws["u"])
            to_bf16(layer.act(ws["u"]), out=ub)
        layer.down.bf16(ub, tokens, residual=a, out=x)
        return layer.ln_out(x, out_bf16=hb)

    def _bf16_attention(self, tokens: int, args: tuple) -> Callable:
        """The bf16 attention for inputs of this size: the fused kernel or torch's bf16 GEMMs (AMX's matrix
        units where present), timed against each other on the first call at each power of two of tokens
        (one warm-up call each: oneDNN builds its kernels then), like a projection's kernels (``ops``)."""
        bucket = max(1, tokens).bit_length()
        if bucket not in self.attention_plan:
            paths = {"fused": attention_bf16, "torch": torch_attention_bf16}
            for path in paths.values():
                path(*args)
            seconds = {name: min(ops.time_kernel(path, *args) for _ in range(2)) for name, path in paths.items()}
            self.attention_plan[bucket] = min(seconds, key=seconds.__getitem__)
        return attention_bf16 if self.attention_plan[bucket] == "fused" else torch_attention_bf16

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.forward_features(hidden_states, attention_mask)
        )
