"""What the training loop does besides training, as step-end hooks (the shape of HF Trainer's callbacks).

The loop (``train.Loop``) calls each hook's ``on_start`` once it is built (the order of the list is the
order of checkpoint registration, and ``Checkpointing`` last: it loads a resumed run's state into what the
others registered), ``on_step_end`` after every optimizer step, and ``on_end`` before the final evaluation.
A command picks its hooks (``standard_hooks``); a user's own loop can use the pruner and the averaging
directly (``Pruner.step()``, ``WeightAverage.update()``), as these hooks do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsebert import checkpoints
from sparsebert.averaging import WeightAverage
from sparsebert.errors import StoppedAtCheckpoint
from sparsebert.pruning import Pruner, resolve_step
from sparsebert.train import Hook, Loop, check_finite


class Pruning(Hook):
    """Builds the pruner once the run's length is known (its schedule is in steps) and steps it."""

    def __init__(self, factory: Callable[[nn.Module, int], Pruner]) -> None:
        self.factory = factory
        self.pruner: Pruner | None = None

    def on_start(self, loop: Loop) -> None:
        self.pruner = self.factory(loop.accelerator.unwrap_model(loop.model), loop.n_steps)
        loop.accelerator.register_for_checkpointing(self.pruner)

    def on_step_end(self, loop: Loop) -> None:
        self.pruner.step()

    def on_end(self, loop: Loop) -> None:
        self.pruner.remove_hooks()

    def log_fields(self) -> dict:
        """The schedule's target, and what the criterion costs: its memory, the last mask update's time."""
        return {"target_sparsity": self.pruner.get_last_sparsity(),
                "criterion_mb": round(self.pruner.scorer.nbytes() / 2**20, 1),
                "mask_update_seconds": round(self.pruner.last_update_seconds, 3)}  # fmt: skip

    def masks(self) -> list[torch.Tensor]:
        return [mask for _, mask in sorted(self.pruner.masks.items())]


class Averaging(Hook):
    """The mean of the weights from ``start`` (a fraction of the run when <= 1), or from where the
    pruner's masks are final if later, to the end; evaluated beside the weights, kept at the end."""

    def __init__(self, start: float, pruning: Pruning | None) -> None:
        self.start, self.pruning = start, pruning
        self.average: WeightAverage | None = None

    def on_start(self, loop: Loop) -> None:
        masks_final = self.pruning.pruner.schedule.end_step if self.pruning is not None else 0
        start = max(resolve_step(self.start, loop.n_steps), masks_final)  # masks fixed: the mean is as sparse
        self.average = WeightAverage(loop.accelerator.unwrap_model(loop.model), start)
        loop.accelerator.register_for_checkpointing(self.average)

    def on_step_end(self, loop: Loop) -> None:
        self.average.update(loop.state.step)

    def on_evaluate(self, loop: Loop, record: dict) -> None:
        if self.average.count:
            with self.average.applied():
                record["metrics_average"] = loop.evaluate()

    def on_end(self, loop: Loop) -> None:
        if self.average.count:
            last = loop.evaluate()
            loop.log({"step": loop.state.step, "event": "eval_last_weights", "metrics": last,
                      "averaged_steps": self.average.count})  # fmt: skip
            self.average.copy_to()


class Logging(Hook):
    """Every ``log_every`` steps (and the last): the mean loss and loss terms since the last record,
    reduced over processes, checked finite, with the LR and the other hooks' fields."""

    def on_step_end(self, loop: Loop) -> None:
        step = loop.state.step
        if step % loop.config.training.log_every and step != loop.n_steps:
            return
        check_finite(loop)
        acc, n = loop.accelerator, len(loop.losses)
        mean = float(acc.reduce(torch.stack(loop.losses).mean(), "mean"))
        parts = {f"loss_{k}": float(acc.reduce(v / n, "mean")) for k, v in loop.parts.items()}
        record = {"step": step, "epoch": loop.state.epoch, "loss": mean, "lr": loop.scheduler.get_last_lr()[0]}
        for hook in loop.hooks:
            record.update(hook.log_fields())
        loop.log({**record, **parts})
        loop.losses, loop.parts = [], {}


class Evaluation(Hook):
    """Dev metrics every ``eval_every`` steps (the final evaluation is the loop's)."""

    def on_step_end(self, loop: Loop) -> None:
        every, step = loop.config.training.eval_every, loop.state.step
        if every and step % every == 0 and step < loop.n_steps:
            record = {"step": step, "event": "eval", "metrics": loop.evaluate()}
            for hook in loop.hooks:
                hook.on_evaluate(loop, record)
            loop.log(record)
            if loop.accelerator.is_local_main_process:  # one console line per evaluation, above the bar
                shown = "  ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items() if v is not None)
                tqdm.write(f"step {step}/{loop.n_steps}: dev {shown}")


class Checkpointing(Hook):
    """Resume at the start; at a stop request (Ctrl-C, SIGTERM) save and stop; save every ``save_every``
    steps and at the last step (an interrupt in the final evaluation or save then loses nothing)."""

    def on_start(self, loop: Loop) -> None:
        if loop.config.run.resume and (loop.output_dir / checkpoints.LATEST).exists():  # settled when claimed
            checkpoints.load(loop.accelerator, loop.output_dir)
            if loop.accelerator.is_main_process:
                loop.log_file.rewind(loop.state.step)  # the steps after the checkpoint run again
            loop.log({"event": "resume", "step": loop.state.step})

    def on_step_end(self, loop: Loop) -> None:
        step, every = loop.state.step, loop.config.training.save_every
        if self._should_stop(loop):
            self._save(loop)
            loop.log({"event": "interrupted", "step": step})
            raise StoppedAtCheckpoint
        if every and (step % every == 0 or step >= loop.n_steps):
            self._save(loop)

    @staticmethod
    def _save(loop: Loop) -> None:
        check_finite(loop, with_weights=True)
        checkpoints.save(loop.accelerator, loop.output_dir, loop.state.step)

    @staticmethod
    def _should_stop(loop: Loop) -> bool:
        """Whether any process was asked to stop (all processes must agree, or a barrier hangs)."""
        if loop.accelerator.num_processes == 1:
            return loop.stop.requested
        flag = torch.tensor(float(loop.stop.requested), device=loop.accelerator.device)
        return bool(loop.accelerator.reduce(flag, "sum") > 0)


def standard_hooks(pruner_factory: Callable[[nn.Module, int], Pruner] | None = None,
                   average_from: float | None = None) -> list[Hook]:  # fmt: skip
    """A command's hooks, in the order that matters: state registered before the checkpoint loads it,
    the pruner stepped before the average takes the step's weights, the log before an evaluation."""
    pruning = Pruning(pruner_factory) if pruner_factory is not None else None
    averaging = Averaging(average_from, pruning) if average_from is not None else None
    hooks = [pruning, averaging, Logging(), Evaluation(), Checkpointing()]
    return [hook for hook in hooks if hook is not None]
