"""Dense vs sparse latency, measured side by side in one process (the logic behind ``sparsebert bench``).

Both models see the same inputs; runs alternate dense/sparse so a background load slows both alike, and
the reported figure is the median after warm-up.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel

from sparsebert.errors import SparseBertError
from sparsebert.pruning import MagnitudePruner, sparsity_report
from sparsebert.report import pyplot
from sparsebert.runtime.convert import sparsify

ARCHS: dict[str, dict] = {
    "bert-base": {},  # BertConfig() defaults: hidden 768, 12 layers, 12 heads, FFN 3072
    "minilm-l6": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
}


@dataclass
class BenchResult:
    batch_size: int
    seq_len: int
    threads: int
    sparsity: float
    dense_ms: float
    sparse_ms: float
    speedup: float
    model: str = ""
    kernels: str = ""

    @property
    def dense_sentences_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.dense_ms

    @property
    def sparse_sentences_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.sparse_ms


def random_pruned_model(arch: str, sparsity: float, seed: int = 0) -> nn.Module:
    """A randomly initialised encoder of a known shape, magnitude-pruned per matrix to ``sparsity``."""
    if arch not in ARCHS:
        raise SparseBertError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**ARCHS[arch])).eval()
    if sparsity > 0:
        MagnitudePruner.one_shot(model, sparsity)
    return model


def median_ms(fns: list[Callable[[], object]], warmup: int, reps: int, budget_s: float) -> list[float]:
    """Interleaved timing of several callables; fewer reps when one call is slow (but at least 3)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for i in range(reps):
        for fn, bucket in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            bucket.append(1000.0 * (time.perf_counter() - t0))
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return [statistics.median(t) for t in times]


def bench_pair(
    dense: nn.Module,
    sparse: nn.Module,
    batch_sizes: list[int],
    seq_len: int,
    threads: int,
    sparsity: float,
    label: str = "",
    kernels: str = "",
    warmup: int = 2,
    reps: int = 20,
    budget_s: float = 30.0,
    seed: int = 0,
) -> list[BenchResult]:
    torch.set_num_threads(threads)
    vocab = dense.config.vocab_size
    results = []
    gen = torch.Generator().manual_seed(seed)
    for bs in batch_sizes:
        ids = torch.randint(0, vocab, (bs, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            dense_ms, sparse_ms = median_ms(
                [
                    lambda m=dense, i=ids, a=mask: m(input_ids=i, attention_mask=a),
                    lambda m=sparse, i=ids, a=mask: m(input_ids=i, attention_mask=a),
                ],
                warmup,
                reps,
                budget_s,
            )
        results.append(
            BenchResult(bs, seq_len, threads, sparsity, dense_ms, sparse_ms, dense_ms / sparse_ms, label, kernels)
        )
    return results


def bench_model(
    model: nn.Module,
    batch_sizes: list[int],
    seq_len: int,
    threads: int,
    label: str = "",
    mode: str = "auto",
    max_density: float | None = None,
    backend: str = "auto",
    **timing,
) -> list[BenchResult]:
    """Benchmark a (pruned) model against its own sparsified copy."""
    model.eval()
    sparsity = sparsity_report(model)["overall"]
    fast = copy.deepcopy(model)
    kwargs = {} if max_density is None else {"max_density": max_density}
    report = sparsify(fast, mode=mode, backend=backend, **kwargs)
    return bench_pair(model, fast, batch_sizes, seq_len, threads, sparsity, label, report.summary(), **timing)


def format_table(results: list[BenchResult]) -> str:
    head = (
        f"{'model':<12} {'sparsity':>8} {'batch':>5} {'seq':>4} {'thr':>3} {'dense ms':>10} {'sparse ms':>10} "
        f"{'speedup':>7} {'dense sent/s':>12} {'sparse sent/s':>13}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.model:<12} {100 * r.sparsity:7.1f}% {r.batch_size:>5} {r.seq_len:>4} {r.threads:>3} "
            f"{r.dense_ms:10.2f} {r.sparse_ms:10.2f} {r.speedup:6.2f}x {r.dense_sentences_per_s:12.1f} "
            f"{r.sparse_sentences_per_s:13.1f}"
        )
    return "\n".join(rows)


def results_json(results: list[BenchResult]) -> dict:
    return {"results": [asdict(r) for r in results]}


def plot_sweep(results: list[BenchResult], path: str) -> None:
    """Sentences/s against compression ratio 1/(1-sparsity), one line per (model, batch size)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[tuple[str, int], list[BenchResult]] = {}
    for r in results:
        groups.setdefault((r.model, r.batch_size), []).append(r)
    for (model, bs), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.sparsity)
        ratios = [1.0 / max(1e-9, 1.0 - r.sparsity) for r in rs]
        line = ax.plot(ratios, [r.sparse_sentences_per_s for r in rs], marker="o", label=f"{model} b{bs} sparse")[0]
        ax.plot(
            ratios,
            [r.dense_sentences_per_s for r in rs],
            linestyle="--",
            color=line.get_color(),
            label=f"{model} b{bs} dense",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio of the pruned layers, 1 / (1 - sparsity)")
    ax.set_ylabel("sentences / s")
    ax.set_title(f"seq len {results[0].seq_len}, {results[0].threads} threads" if results else "")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
