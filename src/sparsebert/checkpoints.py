"""A run's checkpoints: two kept, each with the digest of every file, the newest good one resumed.

Hours of training sit behind a checkpoint, and run folders live on disks that fill up, copies that are
cut short and hands that edit files. So a checkpoint is written into ``checkpoint.tmp``, its manifest
(the step and the SHA-256 of each file, read back from disk) written last, and only then rotated in:
``checkpoint`` becomes ``checkpoint.prev``, ``checkpoint.tmp`` becomes ``checkpoint``. On resume every
candidate is checked against its manifest and the newest good one is used; a damaged one is moved aside
(renamed, never deleted) with a line saying so. A kill at any point of a save leaves at least one good
checkpoint: a torn ``checkpoint.tmp`` has no manifest (or fails it) and is not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from sparsebert.errors import SparseBertError

LATEST, PREVIOUS, PARTIAL = "checkpoint", "checkpoint.prev", "checkpoint.tmp"
MANIFEST = "sparsebert_checkpoint.json"
WAY_OUT = "restore the run folder from a copy, or start the run again with --overwrite"
log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def save(accelerator: Accelerator, out: Path, step: int) -> None:
    """Write a checkpoint of everything the accelerator holds (model, optimizer, registered objects)."""
    tmp = out / PARTIAL
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp, step)
        if (out / PREVIOUS).exists():
            shutil.rmtree(out / PREVIOUS)
        if (out / LATEST).exists():
            (out / LATEST).rename(out / PREVIOUS)
        tmp.rename(out / LATEST)
    accelerator.wait_for_everyone()


def exists(out: Path) -> bool:
    """Whether the folder holds anything a resume could start from (good or not: ``settle`` decides)."""
    return any((out / name / MANIFEST).exists() for name in (LATEST, PREVIOUS, PARTIAL)) or (out / LATEST).is_dir()


@dataclass
class Settled:
    step: int | None  # None: a checkpoint written before checkpoints had manifests (taken as it is)
    notes: list[str]


def settle(out: Path) -> Settled | None:
    """Pick the newest good checkpoint and make it ``checkpoint`` (the next older good one ``checkpoint.prev``).

    Damaged candidates are renamed ``<name>.damaged`` (nothing deleted); a torn ``checkpoint.tmp`` without
    a manifest goes. None when there is no checkpoint; a one-line error when there are some and none is good.
    """
    found = {name: out / name for name in (LATEST, PARTIAL, PREVIOUS) if (out / name).is_dir()}
    if not found:
        return None
    if set(found) == {LATEST} and not (found[LATEST] / MANIFEST).exists():
        return Settled(None, [])  # written by an older sparsebert: no digests to check
    problems = {name: problem(folder) for name, folder in found.items()}
    torn = {name for name, wrong in problems.items() if name == PARTIAL and not (found[name] / MANIFEST).exists()}
    good = sorted(((step_of(found[name]), name) for name, wrong in problems.items() if wrong is None), reverse=True)
    damaged = {name: wrong for name, wrong in problems.items() if wrong is not None and name not in torn}
    if not good and not damaged:  # only a first save, cut short: a fresh start
        shutil.rmtree(found[PARTIAL])
        return None
    if not good:  # nothing is moved or deleted: the user decides
        listed = "; ".join(f"{name}: {wrong}" for name, wrong in damaged.items())
        raise SparseBertError(f"{out}: no good checkpoint to resume from ({listed}); {WAY_OUT}")
    notes = []
    for name in torn:
        shutil.rmtree(found[name])  # our own save, cut short before it was complete: nothing to keep
    for name, wrong in damaged.items():
        aside = _aside(out, name)
        found[name].rename(aside)
        notes.append(f"{out / name} is damaged ({wrong}); moved to {aside.name}")
    _arrange(out, [name for _, name in good[:2]])
    if notes:
        notes.append(f"resuming from the checkpoint of step {good[0][0]}")
    return Settled(good[0][0], notes)


def _aside(out: Path, name: str) -> Path:
    aside, n = out / f"{name}.damaged", 1
    while aside.exists():
        n += 1
        aside = out / f"{name}.damaged-{n}"
    return aside


def _arrange(out: Path, newest_first: list[str]) -> None:
    """Rename the chosen folders to ``checkpoint`` and ``checkpoint.prev`` (through temporary names)."""
    staged = []
    for name in newest_first:
        (out / name).rename(out / f"{name}.settling")
        staged.append(out / f"{name}.settling")
    for name in (LATEST, PREVIOUS, PARTIAL):  # what was not chosen: an older good copy, beyond the two kept
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for folder, name in zip(staged, (LATEST, PREVIOUS), strict=False):
        folder.rename(out / name)


def load(accelerator: Accelerator, out: Path) -> None:
    """Load ``checkpoint`` into what the accelerator holds; anything it cannot read is a one-line error."""
    folder = out / LATEST
    try:
        accelerator.load_state(str(folder))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SparseBertError(
            f"{folder}: could not load the checkpoint ({type(exc).__name__}: {first}); {WAY_OUT}"
        ) from None


def remove(out: Path) -> None:
    """A finished run keeps no checkpoint (the damaged copies moved aside stay for the user to look at)."""
    for name in (LATEST, PREVIOUS, PARTIAL):
        if (out / name).exists():
            shutil.rmtree(out / name)
