"""Dense vs sparse latency, measured side by side in one process (the logic behind ``sparsebert bench``).

Every path sees the same inputs: the sparse engine and each dense baseline a user could pick instead
(``runtime.baselines``: fp32, bf16 where native, ONNX Runtime fp32 / int8). Runs alternate between the
paths so a background load slows all alike, the reported figure is the median after warm-up, and each
path's output is compared with dense fp32's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import BertConfig, BertModel

from sparsebert.errors import SparseBertError
from sparsebert.pruning import Pruner, sparsity_report
from sparsebert.report import flops_per_sequence, pyplot
from sparsebert.runtime.baselines import Forward, build_baselines, first_output, resolve_baselines
from sparsebert.runtime.convert import sparsify
from sparsebert.runtime.timing import machine, median_ms  # their home is timing; still importable from here

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
    backend: str = "auto"  # the sparse engine's kernels (several backends time in one run, one result each)
    kernels: str = ""
    gflops: float = 0.0  # the sparse forward's useful work (forward_flops) per second
    share_of_gemm: float = 0.0  # gflops over this CPU's dense fp32 GEMM rate measured in the same run
    baselines: dict[str, float] = field(default_factory=dict)  # ms of each dense path timed, fp32 included
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # each path's output vs dense fp32's
    best_dense: str = "fp32"
    speedup_vs_best_dense: float = 0.0

    @property
    def dense_sentences_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.dense_ms

    @property
    def sparse_sentences_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.sparse_ms


def random_pruned_model(arch: str, sparsity: float, seed: int = 0, block: int = 1) -> nn.Module:
    """A randomly initialised encoder of a known shape, magnitude-pruned per matrix to ``sparsity`` (in
    groups of ``block`` consecutive input weights: 4 for the int8 backend)."""
    if arch not in ARCHS:
        raise SparseBertError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**ARCHS[arch])).eval()
    if sparsity > 0:
        Pruner.one_shot(model, sparsity, block=block)
    return model


def forward_flops(model: nn.Module, batch: int, seq: int) -> float:
    """The work of one forward that any engine must do, as the run report counts it
    (``report.flops_per_sequence``: the non-zero products, attention's two, the head). What ``gflops``
    divides, so engines and CPUs compare on one measure."""
    nonzeros = sparsity_report(model)["nonzero"]["pruned_layers"]
    return float(batch * flops_per_sequence(model.config, nonzeros, seq))


def gemm_gflops(threads: int, size: int = 1024, reps: int = 5) -> float:
    """This CPU's dense fp32 GEMM rate on ``threads`` threads (best of ``reps`` products of two ``size``-square
    matrices): the yardstick ``share_of_gemm`` is read against, measured rather than taken from a data sheet."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    torch.mm(a, b)
    best = min(median_ms([lambda: torch.mm(a, b)], 0, 1, 1.0)[0] for _ in range(reps))
    return 2.0 * size**3 / best / 1e6


def bench_pair(
    dense: nn.Module,
    sparse: nn.Module | dict[str, nn.Module],
    batch_sizes: list[int],
    seq_len: int,
    threads: int,
    sparsity: float,
    label: str = "",
    kernels: Callable[[str, int], str] | None = None,
    baselines: dict[str, Forward] | None = None,
    warmup: int = 2,
    reps: int = 20,
    budget_s: float = 30.0,
    seed: int = 0,
) -> list[BenchResult]:
    """Time the sparse model(s) against each dense baseline (default: ``dense`` in fp32), interleaved.

    ``sparse``: one model, or several by backend name, each timed in the same rounds and reported as its
    own result. ``kernels(backend, tokens)`` says which kernels a sparse model ran at that input size (read
    after the first call, which is when a timed backend chooses them)."""
    torch.set_num_threads(threads)
    sparse = sparse if isinstance(sparse, dict) else {"auto": sparse}
    paths = dict(baselines or {"fp32": first_output(dense)})
    engines = {f"sparse {name}": first_output(model) for name, model in sparse.items()}
    gemm = gemm_gflops(threads)
    sequence_flops = forward_flops(dense, 1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for bs in batch_sizes:
        ids = torch.randint(0, dense.config.vocab_size, (bs, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            reference = paths["fp32"](ids, mask)
            every = paths | engines
            diffs = {n: float((fn(ids, mask) - reference).abs().max()) for n, fn in every.items() if n != "fp32"}
            calls = [lambda fn=fn, i=ids, a=mask: fn(i, a) for fn in every.values()]
            timed = dict(zip(every, median_ms(calls, warmup, reps, budget_s), strict=True))
        sparse_ms = {name: timed.pop(f"sparse {name}") for name in sparse}
        best = min(timed, key=timed.__getitem__)
        for name, ms in sparse_ms.items():
            result = BenchResult(bs, seq_len, threads, sparsity, timed["fp32"], ms, timed["fp32"] / ms, label, name)
            result.baselines = timed
            result.max_abs_diff = {n: d for n, d in diffs.items() if n in timed} | {"sparse": diffs[f"sparse {name}"]}
            result.kernels = kernels(name, bs * seq_len) if kernels else ""
            result.best_dense, result.speedup_vs_best_dense = best, timed[best] / ms
            result.gflops = bs * sequence_flops / ms / 1e6
            result.share_of_gemm = result.gflops / gemm
            results.append(result)
    return results


def bench_model(
    model: nn.Module,
    batch_sizes: list[int],
    seq_len: int,
    threads: int,
    label: str = "",
    mode: str = "auto",
    max_density: float | None = None,
    backend: str | list[str] = "auto",
    baselines: list[str] = ("fp32",),
    **timing,
) -> list[BenchResult]:
    """Benchmark a (pruned) model's sparsified copy, one per backend in ``backend``, against the model on
    each dense path in ``baselines``, all in the same interleaved rounds."""
    model.eval()
    sparsity = sparsity_report(model)["overall"]
    fast, reports = {}, {}
    for name in [backend] if isinstance(backend, str) else backend:
        fast[name] = copy.deepcopy(model)
        reports[name] = sparsify(fast[name], mode=mode, backend=name, max_density=max_density)
    dense_paths = build_baselines(model, resolve_baselines(list(baselines)), seq_len, threads)

    def kernels(name: str, tokens: int) -> str:
        return reports[name].summary(tokens)

    return bench_pair(model, fast, batch_sizes, seq_len, threads, sparsity, label, kernels, dense_paths, **timing)


def format_table(results: list[BenchResult]) -> str:
    """One row per result: every dense path's ms, the sparse engine's, and its speedup over fp32 and the best."""
    names = list(results[0].baselines) if results else ["fp32"]
    head = (
        f"{'model':<12} {'sparsity':>8} {'batch':>5} {'seq':>4} {'thr':>3} "
        + " ".join(f"{name + ' ms':>12}" for name in names)
        + f" {'sparse':>8} {'ms':>9} {'vs fp32':>7} {'vs best dense':>18} {'sent/s':>8} {'GFLOP/s':>8} {'of GEMM':>7}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.model:<12} {100 * r.sparsity:7.1f}% {r.batch_size:>5} {r.seq_len:>4} {r.threads:>3} "
            + " ".join(f"{r.baselines.get(name, float('nan')):12.2f}" for name in names)
            + f" {r.backend:>8} {r.sparse_ms:9.2f} {r.speedup:6.2f}x {r.speedup_vs_best_dense:6.2f}x"
            f" ({r.best_dense:>8}) {r.sparse_sentences_per_s:8.1f} {r.gflops:8.1f} {100 * r.share_of_gemm:6.0f}%"
        )
    return "\n".join(rows)


def results_json(results: list[BenchResult]) -> dict:
    return {"machine": machine(), "torch": torch.__version__, "results": [asdict(r) for r in results]}


def plot_sweep(results: list[BenchResult], path: str) -> None:
    """Sentences/s against compression ratio 1/(1-sparsity): one line per (model, batch size, backend), and
    dense fp32's dashed beside the first backend of each (model, batch size)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[tuple[str, int, str], list[BenchResult]] = {}
    for r in results:
        groups.setdefault((r.model, r.batch_size, r.backend), []).append(r)
    dense_drawn: set[tuple[str, int]] = set()
    for (model, bs, backend), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.sparsity)
        ratios = [1.0 / max(1e-9, 1.0 - r.sparsity) for r in rs]
        label = f"{model} b{bs} sparse {backend}"
        line = ax.plot(ratios, [r.sparse_sentences_per_s for r in rs], marker="o", label=label)[0]
        if (model, bs) not in dense_drawn:
            dense_drawn.add((model, bs))
            dense = [r.dense_sentences_per_s for r in rs]
            ax.plot(ratios, dense, linestyle="--", color=line.get_color(), label=f"{model} b{bs} dense")
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
