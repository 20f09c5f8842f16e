"""Training cost on real task batches: the previous fp32 recipe vs the new defaults, side by side.

One process, interleaved (step i of every variant before step i+1 of any), so machine noise hits
all variants alike. Each variant trains its own copy of the student on its own batches:

  before  - shuffled batches padded to their longest example, per-tensor AdamW, fp32
            (what `sparsebert` did until the training-speed issue)
  new     - length-grouped batches, fused AdamW, `--mixed-precision auto` (bf16 only where the
            CPU or GPU has it natively; fp32 elsewhere)
  bf16    - the new defaults with bf16 forced (`--bf16`; on a CPU without bf16 it is emulated)
  fp32    - the new defaults in fp32, timed where `auto` chose bf16 (a CPU or GPU with native bf16),
            so that the table separates what bf16 brings from what the batches and AdamW bring

for both a plain fine-tuning step (forward, backward, clipping, AdamW) and a prune-while-distill step
(teacher forward, student forward with hidden states and attention scores, three losses, backward,
clipping, AdamW, mask re-application). Steps per hour come from the mean over the same number of
consecutive batches of each variant's first epoch; the mean padded length of each variant's whole
epoch says how representative that sample is. Pruning bookkeeping, and what each gradient criterion adds
(taylor, obs: its work at every backward pass, its mask update, its memory), are timed on their own.

    .venv/bin/python bench/train_cost.py --data-dir ../shared/data/glue/MRPC --task mrpc --steps 30
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import logging as hf_logging

from sparsebert.data import DataSource, encode, load_task_data, make_loader
from sparsebert.distill import DistillationLoss, LossWeights, distillation_step
from sparsebert.hardware import resolve_mixed_precision
from sparsebert.models import fast_attention, load_model, load_tokenizer
from sparsebert.pruning import CubicSparsitySchedule, Pruner
from sparsebert.tasks import get_task
from sparsebert.train import param_groups

VARIANTS = {  # name: (length-grouped batches, fused AdamW, precision)
    "before": (False, False, "no"),
    "new": (True, True, "auto"),
    "bf16": (True, True, "bf16"),
    "fp32": (True, True, "no"),
}


def build_step(kind: str, student, teacher, fused: bool, precision: str, pruner) -> Callable[[dict], None]:
    """One optimizer step of ``kind`` (finetune | distill) on a batch, as the training loop runs it."""
    bf16 = precision == "bf16"
    # as the training loop runs them: eager attention in bf16 on a CPU (a teacher of its own for that)
    student = fast_attention(student, precision, "cpu")
    teacher = fast_attention(copy.deepcopy(teacher), precision, "cpu") if bf16 else teacher
    optimizer = torch.optim.AdamW(param_groups(student, 0.01), lr=1e-4, fused=fused)
    if kind == "distill":
        loss_fn = DistillationLoss(student.config, teacher.config, LossWeights.parse("0.1,1,5"))
        distill = distillation_step(teacher, student, loss_fn)

    def step(batch: dict) -> None:
        student.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = student(**batch).loss if kind == "finetune" else distill(student, batch)[0]
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.apply_masks()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="mrpc")
    p.add_argument("--data-dir", default="../shared/data/glue/MRPC")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant and kind")
    p.add_argument("--bf16", action="store_true", help="also time the new defaults with bf16 forced")
    p.add_argument("--run-steps", type=int, default=1000)
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--criteria", nargs="+", default=["taylor", "obs"], help="gradient criteria to cost")
    p.add_argument("--fisher-block", type=int, default=32)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    task = get_task(args.task)
    data = load_task_data(task, DataSource(data_dir=args.data_dir))
    tokenizer = load_tokenizer(args.model)
    features = encode(data.train, tokenizer, args.max_seq_length)
    teacher = load_model(args.model, task).eval()
    base = load_model(args.model, task)
    native_bf16 = resolve_mixed_precision("auto") == "bf16"
    # "bf16" is "new" where the hardware has it; "fp32" is "new" where it has not
    names = ["before", "new"] + (["fp32"] if native_bf16 else ["bf16"] if args.bf16 else [])
    precision = {n: resolve_mixed_precision(VARIANTS[n][2]) for n in names}

    batches, steps, epoch_len = {}, {}, {}
    for name in names:
        grouped, fused, _ = VARIANTS[name]
        loader = make_loader(
            features, tokenizer, args.batch_size, shuffle=True, drop_last=True, group_by_length=grouped
        )
        epoch = list(loader)
        batches[name] = epoch[: args.steps + 1]  # one warm-up step, then the timed ones
        epoch_len[name] = statistics.mean(b["input_ids"].shape[1] for b in epoch)
        for kind in ("finetune", "distill"):
            student = copy.deepcopy(base)
            pruner = None
            if kind == "distill":  # the masks a 90% run holds at its end
                pruner = Pruner.one_shot(student, 0.9)
            steps[kind, name] = build_step(kind, student, teacher, fused, precision[name], pruner)

    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for i in range(args.steps + 1):
        for key, step in steps.items():
            start = time.perf_counter()
            step(batches[key[1]][i])
            if i:
                seconds[key].append(time.perf_counter() - start)

    schedule = CubicSparsitySchedule(0.9, 0, args.run_steps, args.updates)
    pruner = Pruner(copy.deepcopy(base), schedule, criterion="magnitude")
    update = statistics.median(_timed(lambda: pruner.update_masks(0.9)) for _ in range(5))
    apply = statistics.median(_timed(pruner.apply_masks) for _ in range(5))
    bookkeeping = (args.updates * update + args.run_steps * apply) / args.run_steps
    # A gradient criterion adds, at every backward pass of the pruning window, its hook's work (taylor: |w * grad|
    # into a running average; obs: g gᵀ into each Fisher block), and its own mask update (obs: the Fisher's
    # inverse and the survivors' update); timed on gradients of the weights' shape.
    criteria = {}
    for name in args.criteria:
        options = {"fisher_block": args.fisher_block} if name == "obs" else {}
        pruner = Pruner(copy.deepcopy(base), schedule, criterion=name, **options)
        for t in pruner.targets:
            t.module.weight.grad = torch.randn_like(t.module.weight)
        observe = statistics.median(
            _timed(lambda p=pruner: [p.observe(t.name, t.module.weight) for t in p.targets]) for _ in range(5)
        )
        updates = [_timed(lambda p=pruner, s=s: p.update_masks(s)) for s in (0.3, 0.6, 0.8, 0.9, 0.95)]
        criteria[name] = {"observe_seconds": observe, "mask_update_seconds": statistics.median(updates),
                          "memory_mb": round(pruner.scorer.nbytes() / 2**20, 1)}  # fmt: skip

    result = {
        "model": args.model,
        "task": args.task,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "threads": torch.get_num_threads(),
        "timed_steps": args.steps,
        "variants": {
            name: {
                "group_by_length": VARIANTS[name][0],
                "fused_adamw": VARIANTS[name][1],
                "precision": precision[name],
                "mean_padded_length_epoch": round(epoch_len[name], 1),
                "mean_padded_length_timed": round(
                    statistics.mean(b["input_ids"].shape[1] for b in batches[name][1:]), 1
                ),
                **{f"{kind}_seconds": statistics.mean(seconds[kind, name]) for kind in ("finetune", "distill")},
            }
            for name in names
        },
        "mask_update_seconds": update,
        "mask_apply_seconds": apply,
        "bookkeeping_per_step_seconds": bookkeeping,
        "criteria": criteria,
    }
    _report(result, names, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _report(result: dict, names: list[str], args: argparse.Namespace) -> None:
    v = result["variants"]
    print(
        f"{args.model} on {args.task}, batch {args.batch_size}, max length {args.max_seq_length}, "
        f"{result['threads']} threads, mean of {args.steps} steps per variant"
    )
    header = ("variant", "precision", "padded len", "finetune s", "distill s", "distill/h", "speed-up")
    print("{:8} {:9} {:>10} {:>10} {:>9} {:>9} {:>8}".format(*header))
    for name in names:
        r = v[name]
        print(
            f"{name:8} {r['precision']:9} {r['mean_padded_length_epoch']:10.1f} {r['finetune_seconds']:10.3f} "
            f"{r['distill_seconds']:9.3f} {3600 / r['distill_seconds']:9.0f} "
            f"{v['before']['distill_seconds'] / r['distill_seconds']:7.2f}x"
        )
    share = result["bookkeeping_per_step_seconds"] / v["new"]["distill_seconds"]
    print(
        f"fine-tuning speed-up (new vs before): {v['before']['finetune_seconds'] / v['new']['finetune_seconds']:.2f}x"
    )
    print(
        f"mask update {result['mask_update_seconds'] * 1e3:.1f} ms, re-application "
        f"{result['mask_apply_seconds'] * 1e3:.2f} ms: bookkeeping {100 * share:.2f}% of a new distill step"
    )
    step = v["new"]["distill_seconds"]
    for name, c in result["criteria"].items():  # steps per hour of a run whose every step is in the window
        per_step = step + c["observe_seconds"] + args.updates * c["mask_update_seconds"] / args.run_steps
        print(f"{name}: {c['observe_seconds'] * 1e3:.1f} ms per backward pass, mask update "
              f"{c['mask_update_seconds']:.2f} s, {c['memory_mb']:.0f} MB: {3600 / per_step:.0f} distill steps/h "
              f"({3600 / step:.0f} without)")  # fmt: skip


if __name__ == "__main__":
    main()
