"""Using the pruning engine inside Hugging Face's ``Trainer`` (no sparsebert training loop involved).

    pruner = Pruner(model, CubicSparsitySchedule(0.9, start_step=0, end_step=num_steps))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PrunerCallback(pruner)])
    trainer.train()

For distillation in a Trainer, compute ``DistillationLoss`` in an overridden ``compute_loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sparsebert.errors import SparseBertError
from sparsebert.pruning import Pruner

PRUNER_STATE = "sparsebert_pruner.pt"


class PrunerCallback(TrainerCallback):
    """Calls ``pruner.step()`` after every optimizer step, exactly as sparsebert's own loop does.

    The pruner's state (masks, schedule position) travels with the Trainer's checkpoints: written into
    each ``checkpoint-N`` folder, and read back when the Trainer resumes from one, so a resumed run prunes
    exactly as an uninterrupted one. Callbacks are not told which folder the Trainer resumed from: it is
    taken to be ``output_dir/checkpoint-<step>`` (what ``resume_from_checkpoint=True`` picks), or pass
    ``resume_from``. A resume without the pruner's state is refused rather than pruned from scratch.
    """

    def __init__(self, pruner: Pruner, resume_from: str | Path | None = None) -> None:
        self.pruner = pruner
        self.resume_from = Path(resume_from) if resume_from else None

    def _folder(self, args, state) -> Path:
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.global_step:
            return control
        saved = (self.resume_from or self._folder(args, state)) / PRUNER_STATE  # the checkpoint just loaded
        if not saved.exists():
            raise SparseBertError(f"resuming at step {state.global_step} without the pruner's state ({saved})")
        self.pruner.load_state_dict(torch.load(saved, weights_only=True))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            torch.save(self.pruner.state_dict(), self._folder(args, state) / PRUNER_STATE)
        return control
