"""Profile one prune-while-distill step on a real batch (the table in BENCHMARKS.md, "Profile of one step").

A batch of 32 MRPC training pairs near the median length, MiniLM-L6 as teacher and student, the step
sparsebert runs (teacher forward, student forward with hidden states and attention scores, the three
losses, backward, clipping, AdamW): median step time, then ``torch.profiler``'s table over two steps.

    .venv/bin/python bench/profile_step.py                 # per-tensor AdamW, fp32
    .venv/bin/python bench/profile_step.py --fused         # fused AdamW
    .venv/bin/python bench/profile_step.py --fused --bf16  # under torch.autocast(bfloat16)
    .venv/bin/python bench/profile_step.py --fused --bf16 --sdpa  # bf16 with torch's fused CPU attention
    .venv/bin/python bench/profile_step.py --fused --bf16 --squad ../shared/data/squad/train-articles-00-35.json

``--squad``: SQuAD training windows of the file's first 100 questions instead (QA heads: the step ``--task
squad`` runs), 32 near their median length; ``--longest``: the 32 longest instead of the median ones.

The models' attention is chosen as the training loop chooses it (`models.fast_attention`: eager in bf16);
`--sdpa` keeps torch's fused kernel, as the loop does in fp32 and on CUDA.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DataCollatorWithPadding
from transformers import logging as hf_logging

from sparsebert.data import DataSource, encode, load_task_data
from sparsebert.distill import DistillationLoss, LossWeights, distillation_step
from sparsebert.models import fast_attention, load_model, load_tokenizer
from sparsebert.qa import prepare_train_features, read_squad
from sparsebert.runtime.bench import median_ms
from sparsebert.tasks import get_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/glue/MRPC")
    p.add_argument("--fused", action="store_true", help="fused AdamW")
    p.add_argument("--bf16", action="store_true", help="forward passes under bf16 autocast")
    p.add_argument("--sdpa", action="store_true", help="keep torch's fused attention in bf16 too")
    p.add_argument("--squad", help="a SQuAD v1.1 training file: QA windows instead of MRPC pairs")
    p.add_argument("--longest", action="store_true", help="the 32 longest inputs, not the 32 near the median")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = get_task("squad" if args.squad else "mrpc")
    tokenizer = load_tokenizer("minilm-l6")
    if args.squad:
        features = prepare_train_features(read_squad(args.squad, require_answers=True)[:100], tokenizer)
    else:
        features = encode(load_task_data(task, DataSource(data_dir=args.data_dir)).train, tokenizer, 128)
    features.sort(key=lambda f: len(f["input_ids"]))
    middle = len(features) // 2
    chosen = features[-32:] if args.longest else features[middle - 16 : middle + 16]
    batch = DataCollatorWithPadding(tokenizer)(chosen)
    student, teacher = load_model("minilm-l6", task), load_model("minilm-l6", task).eval()
    if not args.sdpa:
        precision = "bf16" if args.bf16 else "no"
        student, teacher = (fast_attention(m, precision, "cpu") for m in (student, teacher))
    step_fn = distillation_step(
        teacher, student, DistillationLoss(student.config, teacher.config, LossWeights.parse("0.1,1,5"))
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=args.fused)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = step_fn(student, batch)[0]
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = median_ms([step], warmup=2, reps=3, budget_s=float("inf"))[0]
    print(f"batch {tuple(batch['input_ids'].shape)}, fused={args.fused}, bf16={args.bf16}: step {ms / 1000:.3f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
