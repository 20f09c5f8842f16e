"""Training cost of SparseBERT: a prune-while-distill step vs a plain fine-tuning step, side by side.

Measures, in one process and interleaved (this machine is noisy), the median wall time of:
  finetune  - student forward + backward + AdamW step (what `sparsebert finetune` does per step)
  distill   - teacher forward + student forward (hidden states, attention scores) + the three losses
              + backward + AdamW step, without pruning
and the pruning bookkeeping on its own: one mask update (magnitude ranking of every matrix) and one
mask re-application. The amortised bookkeeping share assumes the reference cadence: masks updated
`--updates` times over a run of `--run-steps` steps, masks re-applied after every step.

    .venv/bin/python bench/train_cost.py --model minilm-l6 --batch-size 32 --seq-len 128 --reps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsebert.distill import AttentionScoreRecorder, DistillationLoss
from sparsebert.models import load_model
from sparsebert.pruning import CubicSparsitySchedule, MagnitudePruner
from sparsebert.tasks import get_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--run-steps", type=int, default=1000)
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    torch.manual_seed(0)
    task = get_task("sst2")
    student, teacher = load_model(args.model, task), load_model(args.model, task)
    teacher.eval()
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (args.batch_size,)),
    }
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    loss_fn = DistillationLoss(student.config, teacher.config)
    s_rec, t_rec = AttentionScoreRecorder(student), AttentionScoreRecorder(teacher)
    pruner = MagnitudePruner(student, CubicSparsitySchedule(0.9, 0, args.run_steps, args.updates))

    def finetune_step() -> None:
        student(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    def distill_step() -> None:
        with torch.no_grad(), t_rec:
            t = teacher(**inputs, output_hidden_states=True)
            ts = t_rec.scores(inputs["attention_mask"])
        with s_rec:
            s = student(**inputs, output_hidden_states=True)
            ss = s_rec.scores(inputs["attention_mask"])
        loss_fn(s.logits, t.logits, s.hidden_states, t.hidden_states, ss, ts, batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    timings: dict[str, list[float]] = {"finetune": [], "distill": [], "mask_update": [], "mask_apply": []}
    finetune_step(), distill_step()  # warm-up
    for _ in range(args.reps):
        timings["finetune"].append(timed(finetune_step))
        timings["distill"].append(timed(distill_step))
        timings["mask_update"].append(timed(lambda: pruner.update_masks(0.9)))
        timings["mask_apply"].append(timed(pruner.apply_masks))
    med = {k: statistics.median(v) for k, v in timings.items()}
    bookkeeping = (args.updates * med["mask_update"] + args.run_steps * med["mask_apply"]) / args.run_steps
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "median_seconds": med,
        "distill_over_finetune": med["distill"] / med["finetune"],
        "bookkeeping_per_step": bookkeeping,
        "bookkeeping_share_of_distill_step": bookkeeping / med["distill"],
    }
    print(
        f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {result['threads']} threads, "
        f"medians of {args.reps}"
    )
    print(f"  fine-tuning step        {med['finetune']:.3f} s")
    print(f"  prune-while-distill step {med['distill']:.3f} s  ({result['distill_over_finetune']:.2f}x)")
    print(f"  mask update {med['mask_update'] * 1e3:.1f} ms, mask re-application {med['mask_apply'] * 1e3:.2f} ms")
    print(
        f"  bookkeeping amortised ({args.updates} updates over {args.run_steps} steps): "
        f"{bookkeeping * 1e3:.2f} ms/step = {100 * result['bookkeeping_share_of_distill_step']:.2f}% of a step"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
