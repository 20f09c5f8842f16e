"""The training loop shared by fine-tuning and prune-while-distill, on 🤗 Accelerate.

``Loop.run`` reads top to bottom in a screen: build (optimizer, Accelerate's preparation, LR schedule, the
hooks' start, which is where a resume loads its checkpoint), then for each batch ``train_step`` (loss ->
backward -> optimizer and LR step) and the hooks' step end (pruning, weight averaging, logging,
evaluation, checkpointing: ``sparsebert.hooks``), then the end (final checks and evaluation). What differs
between commands is only ``step_fn`` (how a batch becomes a loss) and the hooks. ``accelerate launch`` runs
the same loop on several processes; mixed precision is Accelerate's.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from sparsebert import checkpoints
from sparsebert.config import TrainingJob, TrainingOptions
from sparsebert.errors import SparseBertError
from sparsebert.hardware import resolve_mixed_precision
from sparsebert.io import JsonlLog
from sparsebert.models import fast_attention
from sparsebert.options import flat_options
from sparsebert.scoring import EvalSplit

StepFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # (prepared model, batch)


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
    the job (the CLI or a user's script calling the API), as torch asks of every distributed program.
    It does not stop gloo's worker thread, which can still abort the interpreter's teardown; the CLI
    skips that teardown (``cli._exit``)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_accelerator(config: TrainingJob) -> Accelerator:
    """One Accelerator per run; a seedable sampler makes the shuffling identical after a resume.

    ``auto`` precision is resolved here and written back into ``config``, so ``config.yaml`` says
    what ran (and a repeat of the run from it uses the same precision). ``--report-to`` names
    accelerate's trackers (TensorBoard, W&B), writing under the run's folder.
    """
    training, report_to = config.training, config.run.report_to
    training.mixed_precision = resolve_mixed_precision(training.mixed_precision)
    trackers = [] if report_to == "none" else [report_to]
    needs = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",)}.get(report_to, ())
    if needs and not any(importlib.util.find_spec(name) for name in needs):  # accelerate would drop it silently
        raise SparseBertError(f"--report-to {report_to} needs the package: pip install {needs[0]}")
    accelerator = new_accelerator(
        mixed_precision=training.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        log_with=trackers or None,
        project_dir=config.run.output_dir,
    )
    set_seed(training.seed)
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


def total_steps(config: TrainingOptions, steps_per_epoch: int) -> int:
    if steps_per_epoch == 0:
        raise SparseBertError(
            f"the training set is smaller than one batch of {config.batch_size} per process; lower --batch-size"
        )
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


@torch.no_grad()
def evaluate(
    model: nn.Module, splits: dict[str, EvalSplit], accelerator: Accelerator, desc: str = "eval"
) -> dict[str, float]:
    """The task's metrics on every dev split: ``dev`` keys as-is, other splits suffixed (``accuracy_mismatched``).

    Each split's scorer (``sparsebert.scoring``) keeps what it needs of every batch's outputs (gathered from
    every process) and turns it into the metrics: the labels' for classification, EM/F1 for extractive QA.
    """
    model.eval()
    results: dict[str, float] = {}
    for split, evaluated in splits.items():
        collected = []
        bar = tqdm(evaluated.loader, desc=f"{desc} {split}", leave=False, disable=not accelerator.is_local_main_process)
        for batch in bar:
            outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
            collected.append(evaluated.scorer.collect(batch, outputs, accelerator))
        metrics = evaluated.scorer.score(collected)
        suffix = "" if split == "dev" else "_" + split.removeprefix("dev_")
        results.update({f"{k}{suffix}": v for k, v in metrics.items()})
    return results


def prepared_splits(splits: dict[str, EvalSplit], loaders: list[DataLoader]) -> dict[str, EvalSplit]:
    """The splits with the loaders Accelerate prepared (in the same order), each keeping its scorer (the same
    object: a QA scorer's last answers are read from the job's splits once the loop is over)."""
    return {name: EvalSplit(loader, s.scorer) for (name, s), loader in zip(splits.items(), loaders, strict=True)}


def weights_digest(model: nn.Module, masks: list[torch.Tensor] = (), extra: list[nn.Module] = ()) -> str:
    """SHA-256 of every parameter (and mask, and extra module such as a distillation projection):
    equal digests on all ranks prove they stayed in sync."""
    h = hashlib.sha256()
    states = [model.state_dict(), *(m.state_dict() for m in extra)]
    for state in states:
        for name, p in sorted(state.items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    for m in masks:
        h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()


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


class Hook:
    """What the loop calls at its moments (HF Trainer's callback shape); does nothing unless overridden.
    The hooks of the commands are in ``sparsebert.hooks``."""

    def on_start(self, loop: Loop) -> None:
        """The loop is built (``n_steps`` known): create state, register it for checkpointing."""

    def on_step_end(self, loop: Loop) -> None:
        """After the optimizer step (``loop.state.step`` already counts it)."""

    def on_evaluate(self, loop: Loop, record: dict) -> None:
        """Add to a periodic evaluation's log record."""

    def on_end(self, loop: Loop) -> None:
        """Training is over, before the final evaluation."""

    def log_fields(self) -> dict:
        """Values for every loss record of the log (e.g. the target sparsity)."""
        return {}

    def masks(self) -> list[torch.Tensor]:
        """Masks that every process must end with (part of the ranks' digest)."""
        return []


@dataclass
class TrainJob:
    """What a command hands the loop: the model, how a batch becomes a loss, the data and how it is scored."""

    model: nn.Module
    step_fn: StepFn
    train_loader: DataLoader
    eval_splits: dict[str, EvalSplit]  # each dev split's batches and scorer
    extra_modules: list[nn.Module] = field(default_factory=list)  # trained beside the model (a projection)
    head_lr: float | None = None


class Loop:
    """Trains ``job.model`` for ``config``'s steps; the hooks do everything else. ``run()`` returns the
    final dev metrics. What the hooks read: ``accelerator``, ``config``, ``model`` (prepared), ``state``,
    ``n_steps``, ``losses`` and ``parts`` (since the last log record), ``stop``; they call ``evaluate``,
    ``log`` and ``check_finite``."""

    def __init__(self, accelerator: Accelerator, config: TrainingJob, job: TrainJob, out: Path, log: JsonlLog,
                 hooks: list[Hook]) -> None:  # fmt: skip
        self.accelerator, self.config, self.job, self.output_dir, self.hooks = accelerator, config, job, out, hooks
        self.log_file, self.model = log, job.model

    def run(self) -> dict[str, float]:
        """Build, start the hooks (a resume loads here), train to the last step or a stop request, end."""
        self._build()
        bar = tqdm(total=self.n_steps, initial=self.state.step, desc=f"train ({self.precision})",
                   disable=not self.accelerator.is_local_main_process)  # fmt: skip
        started = time.perf_counter()
        with finishing_trackers(self.accelerator):
            with StopRequest() as self.stop:
                while self.state.step < self.n_steps:
                    self.train_loader.set_epoch(self.state.epoch)
                    skip = self.state.batch_in_epoch  # a resumed run continues mid-epoch
                    loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                    for batch in loader:
                        self.train_step(batch)
                        bar.update(1)
                        for hook in self.hooks:
                            hook.on_step_end(self)
                        if self.state.step >= self.n_steps:
                            break
                    else:
                        self.state.epoch += 1
                        self.state.batch_in_epoch = 0
            bar.close()
            return self._end(time.perf_counter() - started)  # outside the stop request: Ctrl-C here stops at once

    def _build(self) -> None:
        """Optimizer, Accelerate's preparation, LR schedule, the hooks' start (registrations, resume)."""
        acc, cfg, job = self.accelerator, self.config.training, self.job
        params = param_groups(job.model, cfg.weight_decay, job.head_lr)
        params += [{"params": list(m.parameters()), "weight_decay": 0.0} for m in job.extra_modules]
        # The fused kernel updates every parameter in one pass: ~10x less optimizer time than the
        # per-tensor loop on a CPU, where AdamW over the 11.7M-entry word embedding was ~15% of a step.
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=acc.device.type in ("cpu", "cuda"))
        for module in job.extra_modules:
            module.to(acc.device)
        model = fast_attention(job.model, acc.mixed_precision, acc.device)
        prepared = acc.prepare(model, self.optimizer, job.train_loader, *(s.loader for s in job.eval_splits.values()))
        self.model, self.optimizer, self.train_loader = prepared[:3]
        self.eval_splits = prepared_splits(job.eval_splits, prepared[3:])
        # Counted per process after sharding; the scheduler is stepped once per optimizer step.
        self.n_steps = total_steps(cfg, len(self.train_loader))
        warmup = int(cfg.warmup_ratio * self.n_steps)
        self.scheduler = acc.prepare(
            get_linear_schedule_with_warmup(self.optimizer, warmup, self.n_steps)
            if cfg.lr_schedule == "linear"
            else get_constant_schedule_with_warmup(self.optimizer, warmup)
        )
        self.state, self.losses, self.parts = LoopState(), [], {}
        self.precision = {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)
        acc.register_for_checkpointing(self.state, *job.extra_modules)
        if acc.log_with:  # TensorBoard: <output_dir>/sparsebert/; W&B: project sparsebert, run <output_dir>'s name
            names = {"wandb": {"name": self.output_dir.name}}
            acc.init_trackers("sparsebert", config=tracker_config(self.config), init_kwargs=names)
        for hook in self.hooks:
            hook.on_start(self)
        self.log({"event": "start", "total_steps": self.n_steps, "steps_per_epoch": len(self.train_loader),
                  "processes": acc.num_processes, "mixed_precision": cfg.mixed_precision,
                  "group_by_length": cfg.group_by_length})  # fmt: skip

    def train_step(self, batch: dict) -> None:
        """loss -> backward -> clip -> optimizer and LR step; the loss is kept (on the device) for the log."""
        self.model.train()
        loss, parts = self.job.step_fn(self.model, batch)
        self.accelerator.backward(loss)
        all_reduce_gradients(self.accelerator, self.job.extra_modules)
        if self.config.training.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.losses.append(loss.detach())
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0) + v

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_splits, self.accelerator)

    def log(self, record: dict) -> None:
        """One record into log.jsonl (main process) and its numbers into the trackers, if any."""
        if self.accelerator.is_main_process:
            self.log_file.write({"time": round(time.time(), 3), **record})
        if self.accelerator.trackers and "step" in record:
            self.accelerator.log(tracker_values(record), step=record["step"])

    def _end(self, elapsed: float) -> dict[str, float]:
        """Final checks and evaluation; every process must end with the same weights and masks."""
        acc = self.accelerator
        check_finite(self, with_weights=True)
        for hook in self.hooks:
            hook.on_end(self)
        metrics = self.evaluate()
        masks = [mask for hook in self.hooks for mask in hook.masks()]
        digests = gather_object([weights_digest(acc.unwrap_model(self.model), masks, self.job.extra_modules)])
        self.log({"step": self.state.step, "event": "eval", "metrics": metrics})
        in_sync = len(set(digests)) == 1
        self.log({"event": "end", "train_seconds": round(elapsed, 2), "rank_digests": digests,
                  "ranks_in_sync": in_sync})  # fmt: skip
        if not in_sync:
            raise SparseBertError(f"processes ended with different weights: {digests}")
        return metrics


@contextmanager
def finishing_trackers(accelerator: Accelerator) -> Iterator[None]:
    """The trackers are finished however the run ends (a stop request and a divergence too). Not
    ``accelerator.end_training()``: it also leaves the process group, which the next job of a process uses."""
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


def all_reduce_gradients(accelerator: Accelerator, modules: list[nn.Module]) -> None:
    """Average the extra modules' gradients over processes (DDP does it for the model only), so a
    narrow student's projection stays the same on every rank."""
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for param in module.parameters():
            if param.grad is not None:
                param.grad = accelerator.reduce(param.grad, "mean")


def tracker_config(config: TrainingJob) -> dict:
    """The run's options as trackers take them (TensorBoard's hparams: numbers, text and booleans only)."""
    options = flat_options(config)
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in options.items()}


def tracker_values(record: dict) -> dict[str, float]:
    """A log record's numbers for a tracker: loss terms, LR, sparsity, dev metrics (``dev/accuracy``)."""
    values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time", "epoch")}
    for key in ("metrics", "metrics_average"):
        prefix = "dev" if key == "metrics" else "dev_average"
        values.update({f"{prefix}/{k}": v for k, v in record.get(key, {}).items() if v is not None})
    return values


def check_finite(loop: Loop, with_weights: bool = False) -> None:
    """Stop at a non-finite loss (or weight) before anything is saved from it.

    Losses are kept on the device since the last log record and checked here (at every log record,
    checkpoint and the end), so training never waits for the device just for this check; all processes
    take the same decision. The last good checkpoint stays; nothing is marked finished.
    """
    acc, step = loop.accelerator, loop.state.step
    bad = ~torch.isfinite(torch.stack(loop.losses)) if loop.losses else torch.zeros(0, dtype=torch.bool)
    count = bad.sum().float().to(acc.device)
    if with_weights:
        count = count + sum((~torch.isfinite(p.detach())).sum().float() for p in loop.model.parameters())
    if acc.num_processes > 1:
        count = acc.reduce(count, "sum")
    if float(count) == 0:
        return
    first = step - len(loop.losses) + 1
    where = f"step {first + int(bad.nonzero()[0])}" if bad.any() else f"step {step} (weights)"
    loop.log({"event": "non_finite", "step": step})
    kept = "the last checkpoint is kept" if checkpoints.exists(loop.output_dir) else "no checkpoint was written"
    raise SparseBertError(
        f"training diverged: not-a-number or infinite values at {where}; stopped without saving them "
        f"({kept}). Lower --lr, or check --temperature, --loss-weights and the data"
    )
