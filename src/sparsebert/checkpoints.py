"""A run's checkpoints: two kept, each with the digest of every file, the newest good one resumed.

Hours of training sit behind a checkpoint, and run folders live on disks that fill up, copies that are
cut short and hands that edit files. So a checkpoint is written into ``checkpoint.tmp``, its manifest
(the step and the SHA-256 of each file, read back from disk) written last, and only then rotated in:
``checkpoint`` becomes ``checkpoint.prev``, ``checkpoint.tmp`` becomes ``checkpoint``. Folders are deleted
only after a rename to ``checkpoint.trash``, so a kill in the middle of a deletion leaves nothing that looks
like a checkpoint. On resume every candidate is checked against its manifest and the newest good one is
used; a damaged one is moved aside (renamed, never deleted) with a line saying so. A kill at any point of a
save, or of the settling on resume, leaves at least one good checkpoint under a name this module reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from sparsebert.errors import SparseBertError
from sparsebert.io import file_digest

LATEST, PREVIOUS, PARTIAL = "checkpoint", "checkpoint.prev", "checkpoint.tmp"
TRASH, LEGACY_OLD = "checkpoint.trash", "checkpoint.old"  # LEGACY_OLD: what older versions swapped through
MANIFEST = "sparsebert_checkpoint.json"
WAY_OUT = (
    "restore the folder from a copy, or start the run again (--overwrite; for a stage of compress or compare, "
    "delete the stage's folder and continue with --resume)"
)
log = logging.getLogger(__name__)


def write_manifest(folder: Path, step: int) -> None:
    """The step and every file's digest, read back from disk; written last, so its presence means complete."""
    files = {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    tmp.rename(folder / MANIFEST)


def problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (None: every file matches its manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        int(manifest["step"])
        files = dict(manifest["files"])
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != digest:
            return f"{name} does not match its digest (truncated, changed or damaged)"
    return None


def step_of(folder: Path) -> int:
    return int(json.loads((folder / MANIFEST).read_text())["step"])


def discard(folder: Path) -> None:
    """Delete a folder of ours through a rename, so that a kill mid-deletion leaves only ``checkpoint.trash``."""
    trash = folder.parent / TRASH
    if trash.exists():
        shutil.rmtree(trash)
    folder.rename(trash)
    shutil.rmtree(trash)


def save(accelerator: Accelerator, out: Path, step: int) -> None:
    """Write a checkpoint of everything the accelerator holds (model, optimizer, registered objects)."""
    tmp = out / PARTIAL
    if accelerator.is_main_process and tmp.exists():
        discard(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp, step)
        if (out / PREVIOUS).exists():
            discard(out / PREVIOUS)
        if (out / LATEST).exists():
            (out / LATEST).rename(out / PREVIOUS)
        tmp.rename(out / LATEST)
    accelerator.wait_for_everyone()


def exists(out: Path) -> bool:
    """Whether the folder holds anything a resume could start from (good or not: ``settle`` decides)."""
    return any((out / name).is_dir() for name in (LATEST, PREVIOUS, LEGACY_OLD)) or (out / PARTIAL / MANIFEST).exists()


@dataclass
class Settled:
    step: int | None  # None: a checkpoint written before checkpoints had manifests (taken as it is)
    notes: list[str]


def settle(out: Path) -> Settled | None:
    """Pick the newest good checkpoint and make it ``checkpoint`` (the next older good one ``checkpoint.prev``).

    Damaged candidates are renamed ``<name>.damaged`` (nothing deleted); a torn ``checkpoint.tmp`` without a
    manifest goes. A run folder written by an older version (no manifest anywhere) resumes from its
    ``checkpoint`` unchecked. None when there is no checkpoint; a one-line error, touching nothing, when none
    is good.
    """
    _recover_legacy(out)
    found = {name: out / name for name in (LATEST, PARTIAL, PREVIOUS) if (out / name).is_dir()}
    unchecked = {name for name, folder in found.items() if not (folder / MANIFEST).exists()}
    problems = {name: problem(folder) for name, folder in found.items() if name not in unchecked}
    good = sorted(((step_of(found[name]), name) for name, wrong in problems.items() if wrong is None), reverse=True)
    damaged = {name: wrong for name, wrong in problems.items() if wrong is not None}
    # a folder with no manifest at all was written by an older version: its checkpoint is taken as it is
    legacy = LATEST if not problems and LATEST in unchecked else None
    if not good and legacy is None:
        if damaged:  # nothing is moved or deleted: the user decides
            listed = "; ".join(f"{name}: {wrong}" for name, wrong in damaged.items())
            raise SparseBertError(f"{out}: no good checkpoint to resume from ({listed}); {WAY_OUT}")
        if PARTIAL in found:
            discard(found[PARTIAL])  # only a first save, cut short: a fresh start
        return None
    notes = []
    for name, wrong in damaged.items():
        aside = _aside(out, name)
        found[name].rename(aside)
        notes.append(f"{out / name} is damaged ({wrong}); moved to {aside.name}")
    step = good[0][0] if good else None
    _arrange(out, [name for _, name in good[:2]] if good else [legacy])  # leftovers go with the unchosen
    if notes:
        notes.append(f"resuming from the checkpoint of step {step}" if good else "resuming from the older checkpoint")
    return Settled(step, notes)


def _recover_legacy(out: Path) -> None:
    """Older versions swapped through ``checkpoint.old`` and deleted in place: finish what a kill cut short."""
    if (out / TRASH).exists():
        shutil.rmtree(out / TRASH)
    old = out / LEGACY_OLD
    if old.is_dir():
        if (out / LATEST).is_dir():
            shutil.rmtree(old)  # the new one was in place: the old one is stale
        else:
            old.rename(out / LATEST)  # killed between the two renames: the old one is the complete one


def _aside(out: Path, name: str) -> Path:
    aside, n = out / f"{name}.damaged", 1
    while aside.exists():
        n += 1
        aside = out / f"{name}.damaged-{n}"
    return aside


def _arrange(out: Path, newest_first: list[str]) -> None:
    """Give the chosen folders the names ``checkpoint`` and ``checkpoint.prev``, discarding the others first.
    Each rename goes to a free name, so every state a kill can leave is one that ``settle`` reads again."""
    targets = dict(zip(newest_first, (LATEST, PREVIOUS), strict=False))
    for name in (LATEST, PREVIOUS, PARTIAL):
        if (out / name).is_dir() and name not in targets:
            discard(out / name)
    pending = {src: dst for src, dst in targets.items() if src != dst}
    while pending:
        free = [src for src, dst in pending.items() if not (out / dst).exists()]
        if not free:  # a swap: through checkpoint.tmp, which settle reads (the folder has its manifest)
            src = next(iter(pending))
            (out / src).rename(out / PARTIAL)
            pending[PARTIAL] = pending.pop(src)
            continue
        (out / free[0]).rename(out / pending.pop(free[0]))


def load(accelerator: Accelerator, out: Path) -> None:
    """Load ``checkpoint`` into what the accelerator holds; anything it cannot read is a one-line error."""
    folder = out / LATEST
    try:
        accelerator.load_state(str(folder))
    except Exception as exc:  # a foreign or damaged file fails in many ways; none may be a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SparseBertError(
            f"{folder}: could not load the checkpoint ({type(exc).__name__}: {first}); {WAY_OUT}"
        ) from None


def remove(out: Path) -> None:
    """A finished run keeps no checkpoint (the damaged copies moved aside stay for the user to look at)."""
    for name in (LATEST, PREVIOUS, PARTIAL):
        if (out / name).exists():
            discard(out / name)
