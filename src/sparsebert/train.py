"""The training loop shared by fine-tuning and prune-while-distill, on 🤗 Accelerate.

``Loop.run`` reads top to bottom in a screen: ``_build`` (optimizer, Accelerate's preparation, LR
schedule, pruner, resume), then for each batch ``_train_step`` (loss -> backward -> optimizer step ->
pruner step) and ``_end_of_step`` (log / evaluate / stop / checkpoint), then ``_end`` (final checks).
What differs between commands is only ``step_fn`` (how a batch becomes a loss) and the optional pruner.
``accelerate launch`` runs the same loop on several processes; mixed precision is Accelerate's.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from sparsebert.averaging import WeightAverage
from sparsebert.config import TrainConfig
from sparsebert.errors import SparseBertError, StoppedAtCheckpoint
from sparsebert.io import JsonlLog
from sparsebert.metrics import compute_metrics, predictions_from_logits
from sparsebert.pruning import Pruner, resolve_step
from sparsebert.tasks import TaskSpec

StepFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # (prepared model, batch)
CHECKPOINT = "checkpoint"


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 matrix products in hardware (not emulated)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":  # AMX tiles (Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4)
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` becomes ``bf16`` where the hardware runs it natively, ``no`` (fp32) elsewhere.

    On a CPU without bf16 instructions oneDNN emulates it and a step is ~2.6x slower than in fp32
    (BENCHMARKS.md, "Training cost"), so auto never picks it there. (The choices are checked where
    the option is declared, ``config.PRECISIONS``.)
    """
    if choice != "auto":
        return choice
    device_type = "cuda" if torch.cuda.is_available() and not _forced_cpu() else "cpu"
    return "bf16" if native_bf16(device_type) else "no"


def fast_attention(model: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """Eager attention (bmm, softmax, bmm) for bf16 on a CPU; elsewhere the model keeps its own.

    Torch's fused CPU attention (SDPA) is 2.5-3x slower in bf16 than in fp32: forward and backward of one
    MiniLM layer's attention, batch 32, length 53, took ~29 ms in bf16, 9-12 in fp32 and ~6 eager in bf16
    (`bench/attention_cost.py`; torch 2.13, AMD EPYC with AVX512-BF16), a fifth of a bf16 prune-while-distill
    step (BENCHMARKS.md, "Training cost"). The choice is not saved with the model (HF keeps it out of config.json).
    """
    if precision == "bf16" and torch.device(device).type == "cpu" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model


def _forced_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def new_accelerator(**kwargs) -> Accelerator:
    """An Accelerator for one job. Accelerate keeps its state per process and refuses a second job
    in another precision; the API runs jobs one after another in one process (``compress``, a
    user's script), so the previous job's precision is forgotten (the process group is kept)."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(**kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_close_process_group)  # once, however many jobs the process runs
        atexit.register(_close_process_group)
    return accelerator


def _close_process_group() -> None:
    """Under ``accelerate launch``, leave the process group before the interpreter exits, whoever ran
    the job (the CLI or a user's script calling the API): left to the interpreter's teardown, gloo's
    threads were destroyed unjoined once in CI ("terminate called without an active exception",
    SIGABRT on rank 1 after the model was saved)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_accelerator(config: TrainConfig) -> Accelerator:
    """One Accelerator per run; a seedable sampler makes the shuffling identical after a resume.

    ``auto`` precision is resolved here and written back into ``config``, so ``config.yaml`` says
    what ran (and a repeat of the run from it uses the same precision).
    """
    config.mixed_precision = resolve_mixed_precision(config.mixed_precision)
    accelerator = new_accelerator(
        mixed_precision=config.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )
    set_seed(config.seed)
    return accelerator


@dataclass
class LoopState:
    """Where the loop is; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


def param_groups(model: nn.Module, weight_decay: float, head_lr: float | None = None) -> list[dict]:
    """AdamW groups: no decay on biases and LayerNorm; optionally a separate LR for the task head."""
    base = getattr(model, "base_model_prefix", "")
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or p.ndim == 1
        is_head = head_lr is not None and bool(base) and not name.startswith(base + ".")
        groups.setdefault((no_decay, is_head), []).append(p)
    out = []
    for (no_decay, is_head), params in groups.items():
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if is_head:
            group["lr"] = head_lr
        out.append(group)
    return out


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if steps_per_epoch == 0:
        raise SparseBertError(
            f"the training set is smaller than one batch of {config.batch_size} per process; lower --batch-size"
        )
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


@torch.no_grad()
def evaluate(
    model: nn.Module, loaders: dict[str, DataLoader], task: TaskSpec, accelerator: Accelerator, desc: str = "eval"
) -> dict[str, float]:
    """GLUE metrics on every dev split: ``dev`` keys as-is, other splits suffixed (``accuracy_mismatched``)."""
    model.eval()
    results: dict[str, float] = {}
    for split, loader in loaders.items():
        logits, labels = [], []
        for batch in tqdm(loader, desc=f"{desc} {split}", leave=False, disable=not accelerator.is_local_main_process):
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            lg, lb = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
            logits.append(lg.cpu().numpy())
            labels.append(lb.cpu().numpy())
        preds = predictions_from_logits(task, np.concatenate(logits))
        metrics = compute_metrics(task, preds, np.concatenate(labels))
        suffix = "" if split == "dev" else "_" + split.removeprefix("dev_")
        results.update({f"{k}{suffix}": v for k, v in metrics.items()})
    return results


def weights_digest(model: nn.Module, pruner: Pruner | None = None, extra: list[nn.Module] = ()) -> str:
    """SHA-256 of every parameter (and mask, and extra module such as a distillation projection):
    equal digests on all ranks prove they stayed in sync."""
    h = hashlib.sha256()
    states = [model.state_dict(), *(m.state_dict() for m in extra)]
    for state in states:
        for name, p in sorted(state.items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    if pruner is not None:
        for _, m in sorted(pruner.masks.items()):
            h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()


def recover_checkpoint(output_dir: Path) -> None:
    """Finish a checkpoint swap that a crash (kill -9, power loss) cut short.

    ``_save_checkpoint`` writes ``checkpoint.tmp``, renames ``checkpoint`` to ``checkpoint.old``, renames
    the new one into place, then deletes the old one. Killed between the two renames, only
    ``checkpoint.old`` is complete (``.tmp`` may be too, but nothing says so): it is put back. Killed
    after the second rename, ``checkpoint`` is the new, complete one and the old one is stale: it goes
    (left there, it would make the next save's rename fail).
    """
    final, old = output_dir / CHECKPOINT, output_dir / (CHECKPOINT + ".old")
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old)
    else:
        old.rename(final)


class StopRequest:
    """Turns Ctrl-C / SIGTERM into a request honoured at the next step boundary.

    Stopping between steps keeps the checkpoint exact (no half-applied optimizer update, RNG state at
    a step boundary), so a resumed run continues as if never stopped. A second signal stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Prepared:
    """What ``Loop._build`` hands the loop: the prepared objects and the run's length."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    n_steps: int
    precision: str


@dataclass
class Loop:
    """Everything a run needs; ``run()`` trains and returns the final dev metrics."""

    accelerator: Accelerator
    config: TrainConfig
    model: nn.Module
    step_fn: StepFn
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    task: TaskSpec
    output_dir: Path
    log: JsonlLog
    # Builds the pruner once the run's length is known (the schedule is set in steps).
    pruner_factory: Callable[[nn.Module, int], Pruner] | None = None
    extra_modules: list[nn.Module] = field(default_factory=list)  # e.g. a distillation projection
    head_lr: float | None = None
    # Average the weights from this step (a fraction of the run when <= 1), or from where the pruner's masks
    # are final if that is later, to the end; None: keep the last weights.
    average_from: float | None = None
    state: LoopState = field(default_factory=LoopState)
    pruner: Pruner | None = None
    average: WeightAverage | None = None
    _losses: list[torch.Tensor] = field(default_factory=list)  # since the last log record, on the device
    _parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def _log_window(self, lr: float, bar: tqdm) -> None:
        """Log the mean loss and loss parts since the last record (reduced over processes alike)."""
        self._check_finite()
        acc, n = self.accelerator, len(self._losses)
        mean = float(acc.reduce(torch.stack(self._losses).mean(), "mean"))
        parts = {f"loss_{k}": float(acc.reduce(v / n, "mean")) for k, v in self._parts.items()}
        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": mean, "lr": lr, **parts}
        if self.pruner is not None:
            record["target_sparsity"] = self.pruner.get_last_sparsity()
        self._log(record)
        bar.set_postfix(loss=f"{mean:.4f}")
        self._losses, self._parts = [], {}

    def _check_finite(self, model: nn.Module | None = None) -> None:
        """Stop at a non-finite loss (or, given ``model``, weight) before anything is saved from it.

        Losses are kept on the device since the last log record and checked here (at every log
        record, checkpoint and the end), so training never waits for the device just for this check;
        all processes take the same decision. The last good checkpoint stays; nothing is marked finished.
        """
        acc, step = self.accelerator, self.state.step
        bad = ~torch.isfinite(torch.stack(self._losses)) if self._losses else torch.zeros(0, dtype=torch.bool)
        count = bad.sum().float().to(acc.device)
        if model is not None:
            count = count + sum((~torch.isfinite(p.detach())).sum().float() for p in model.parameters())
        if acc.num_processes > 1:
            count = acc.reduce(count, "sum")
        if float(count) == 0:
            return
        first = step - len(self._losses) + 1
        where = f"step {first + int(bad.nonzero()[0])}" if bad.any() else f"step {step} (weights)"
        self._log({"event": "non_finite", "step": step})
        kept = "the last checkpoint is kept" if (self.output_dir / CHECKPOINT).exists() else "no checkpoint was written"
        raise SparseBertError(
            f"training diverged: not-a-number or infinite values at {where}; stopped without saving them "
            f"({kept}). Lower --lr, or check --temperature, --loss-weights and the data"
        )

    def _save_checkpoint(self) -> None:
        acc = self.accelerator
        self._check_finite(self.model)
        final, tmp = self.output_dir / CHECKPOINT, self.output_dir / (CHECKPOINT + ".tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            old = self.output_dir / (CHECKPOINT + ".old")
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            if old.exists():
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def _should_stop(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop (all processes must agree, or a barrier hangs)."""
        if self.accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum") > 0)

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.log.write({"time": round(time.time(), 3), **record})

    def run(self) -> dict[str, float]:
        """Build, resume if asked, train to the last step (or a stop request), evaluate, check ranks."""
        p = self._build()
        bar = tqdm(total=p.n_steps, initial=self.state.step, desc=f"train ({p.precision})",
                   disable=not self.accelerator.is_local_main_process)  # fmt: skip
        started = time.perf_counter()
        with StopRequest() as stop:
            while self.state.step < p.n_steps:
                p.train_loader.set_epoch(self.state.epoch)
                skip = self.state.batch_in_epoch  # a resumed run continues mid-epoch
                loader = self.accelerator.skip_first_batches(p.train_loader, skip) if skip else p.train_loader
                for batch in loader:
                    self._train_step(p, batch)
                    bar.update(1)
                    if self._end_of_step(p, bar, stop):
                        break
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
        bar.close()
        return self._end(p, time.perf_counter() - started)

    def _build(self) -> _Prepared:
        """Optimizer, Accelerate's preparation, LR schedule, pruner, checkpoint registration, resume."""
        acc, cfg = self.accelerator, self.config
        params = param_groups(self.model, cfg.weight_decay, self.head_lr)
        params += [{"params": list(m.parameters()), "weight_decay": 0.0} for m in self.extra_modules]
        # The fused kernel updates every parameter in one pass: ~10x less optimizer time than the
        # per-tensor loop on a CPU, where AdamW over the 11.7M-entry word embedding was ~15% of a step.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=acc.device.type in ("cpu", "cuda"))
        for module in self.extra_modules:
            module.to(acc.device)
        model = fast_attention(self.model, acc.mixed_precision, acc.device)
        prepared = acc.prepare(model, optimizer, self.train_loader, *self.eval_loaders.values())
        model, optimizer, train_loader = prepared[:3]
        eval_loaders = dict(zip(self.eval_loaders, prepared[3:], strict=True))
        # Counted per process after sharding; the scheduler is stepped once per optimizer step.
        n_steps = total_steps(cfg, len(train_loader))
        warmup = int(cfg.warmup_ratio * n_steps)
        scheduler = acc.prepare(
            get_linear_schedule_with_warmup(optimizer, warmup, n_steps)
            if cfg.lr_schedule == "linear"
            else get_constant_schedule_with_warmup(optimizer, warmup)
        )
        if self.pruner_factory is not None:
            self.pruner = self.pruner_factory(acc.unwrap_model(model), n_steps)
        acc.register_for_checkpointing(self.state, *self.extra_modules)
        if self.pruner is not None:
            acc.register_for_checkpointing(self.pruner)
        if self.average_from is not None:  # masks fixed over the window: the mean is exactly as sparse
            masks_final = self.pruner.schedule.end_step if self.pruner is not None else 0
            start = max(resolve_step(self.average_from, n_steps), masks_final)
            self.average = WeightAverage(acc.unwrap_model(model), start)
            acc.register_for_checkpointing(self.average)
        if cfg.resume and (self.output_dir / CHECKPOINT).exists():
            acc.load_state(str(self.output_dir / CHECKPOINT))
            if acc.is_main_process:
                self.log.rewind(self.state.step)  # the steps after the checkpoint run again
            self._log({"event": "resume", "step": self.state.step})
        self._log({"event": "start", "total_steps": n_steps, "steps_per_epoch": len(train_loader),
                   "processes": acc.num_processes, "mixed_precision": cfg.mixed_precision,
                   "group_by_length": cfg.group_by_length})  # fmt: skip
        self._losses, self._parts = [], {}
        precision = {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)
        return _Prepared(model, optimizer, scheduler, train_loader, eval_loaders, n_steps, precision)

    def _train_step(self, p: _Prepared, batch: dict) -> None:
        """loss -> backward -> clip -> optimizer and LR step -> pruner step (masks re-applied)."""
        p.model.train()
        loss, parts = self.step_fn(p.model, batch)
        self.accelerator.backward(loss)
        self._all_reduce_extra_gradients()
        if self.config.max_grad_norm:
            self.accelerator.clip_grad_norm_(p.model.parameters(), self.config.max_grad_norm)
        p.optimizer.step()
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        if self.pruner is not None:
            self.pruner.step()
        self.state.step += 1
        self.state.batch_in_epoch += 1
        if self.average is not None:
            self.average.update(self.state.step)
        self._losses.append(loss.detach())
        for k, v in parts.items():
            self._parts[k] = self._parts.get(k, 0) + v

    def _all_reduce_extra_gradients(self) -> None:
        """Average the extra modules' gradients over processes (DDP does it for the model only), so a
        narrow student's projection stays the same on every rank."""
        if self.accelerator.num_processes == 1:
            return
        for module in self.extra_modules:
            for param in module.parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, "mean")

    def _end_of_step(self, p: _Prepared, bar: tqdm, stop: StopRequest) -> bool:
        """Log, evaluate, honour a stop request, checkpoint; True once the last step is done."""
        cfg, step = self.config, self.state.step
        if step % cfg.log_every == 0 or step == p.n_steps:
            self._log_window(p.scheduler.get_last_lr()[0], bar)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < p.n_steps:
            self._evaluate(p, step)
        if self._should_stop(stop):
            bar.close()
            self._save_checkpoint()
            self._log({"event": "interrupted", "step": step})
            raise StoppedAtCheckpoint
        # The last step is saved too: an interrupt in the final evaluation or save then loses nothing.
        if cfg.save_every and (step % cfg.save_every == 0 or step >= p.n_steps):
            self._save_checkpoint()
        return step >= p.n_steps

    def _evaluate(self, p: _Prepared, step: int) -> None:
        """Dev metrics of the weights as they are and, once averaging has begun, of their average."""
        acc = self.accelerator
        record = {"step": step, "event": "eval", "metrics": evaluate(p.model, p.eval_loaders, self.task, acc)}
        if self.average is not None and self.average.count:
            with self.average.applied():
                record["metrics_average"] = evaluate(p.model, p.eval_loaders, self.task, acc)
        self._log(record)

    def _end(self, p: _Prepared, elapsed: float) -> dict[str, float]:
        """Final checks and evaluation; every process must end with the same weights and masks."""
        acc = self.accelerator
        if self.pruner is not None:
            self.pruner.remove_hooks()
        self._check_finite(p.model)
        if self.average is not None and self.average.count:
            last = evaluate(p.model, p.eval_loaders, self.task, acc)
            self._log({"step": self.state.step, "event": "eval_last_weights", "metrics": last,
                       "averaged_steps": self.average.count})  # fmt: skip
            self.average.copy_to()
        metrics = evaluate(p.model, p.eval_loaders, self.task, acc)
        digests = gather_object([weights_digest(acc.unwrap_model(p.model), self.pruner, self.extra_modules)])
        self._log({"step": self.state.step, "event": "eval", "metrics": metrics})
        in_sync = len(set(digests)) == 1
        self._log(
            {"event": "end", "train_seconds": round(elapsed, 2), "rank_digests": digests, "ranks_in_sync": in_sync}
        )
        if not in_sync:
            raise SparseBertError(f"processes ended with different weights: {digests}")
        return metrics
