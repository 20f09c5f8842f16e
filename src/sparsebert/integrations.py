"""Using the pruning engine inside Hugging Face's ``Trainer`` (no sparsebert training loop involved).

    pruner = MagnitudePruner(model, CubicSparsitySchedule(0.9, start_step=0, end_step=num_steps))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PrunerCallback(pruner)])
    trainer.train()

For distillation in a Trainer, compute ``DistillationLoss`` in an overridden ``compute_loss``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from sparsebert.pruning import MagnitudePruner


class PrunerCallback(TrainerCallback):
    """Calls ``pruner.step()`` after every optimizer step, exactly as sparsebert's own loop does."""

    def __init__(self, pruner: MagnitudePruner) -> None:
        self.pruner = pruner

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step()
        return control
