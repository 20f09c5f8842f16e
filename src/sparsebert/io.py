"""Crash-safe file output: everything lands under its final name only when complete."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sparsebert.errors import SparseBertError


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write to a temporary sibling, fsync, then rename (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in blocks (checkpoints and the compressed format record them)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path | str, keys: tuple[str, ...] = (), way_out: str = "") -> dict:
    """A JSON object that sparsebert wrote, checked as it is read: a missing, empty, torn or foreign file
    (one without ``keys``) is a one-line error naming the file, what is wrong and ``way_out``."""
    path = Path(path)
    way_out = way_out or "restore it from a copy, or run the job that writes it again"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparseBertError(f"{path}: missing; {way_out}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "empty" if path.exists() and path.stat().st_size == 0 else f"damaged ({str(exc).splitlines()[0]})"
        raise SparseBertError(f"{path}: {what}; {way_out}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise SparseBertError(f"{path}: not what sparsebert writes there (no {', '.join(missing)}); {way_out}")
    return obj


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null: strict JSON readers reject bare ``NaN`` (a Pearson
    correlation of constant predictions is NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def publish_dir(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` into ``target`` by rename, then remove ``staging``.

    Used for saved models: the files are complete before they appear under their final names.
    """
    target.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()  # what an ordinary file gets (safetensors writes its files 0600)
    weights_last = sorted(staging.iterdir(), key=lambda item: item.name == "model.safetensors")  # the "done" marker
    for item in weights_last:
        dest = target / item.name
        if dest.is_dir() and item.is_dir():
            shutil.rmtree(dest)
        if item.is_file():
            item.chmod(mode)
        os.replace(item, dest)
    staging.rmdir()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


LOCK, OWNER, MARKER = ".sparsebert.lock", ".sparsebert.owner", ".sparsebert"


def check_not_an_input(out: Path | str, inputs: list[Path | str | None]) -> None:
    """Refuse an output folder that is, contains or sits inside an input (data, teacher, student, recipe).

    ``--overwrite`` deletes the output folder's contents: pointed at the data or the teacher, it would
    delete them, and a run writing inside its inputs mixes outputs with them.
    """
    out_path = Path(out).expanduser().resolve()
    for given, path in _on_disk(inputs):
        if out_path == path or out_path in path.parents or path in out_path.parents:
            raise SparseBertError(f"output directory {out} overlaps the input {given}; choose another --output-dir")


def _on_disk(inputs: list[Path | str | None]) -> Iterator[tuple[Path | str, Path]]:
    """(as given, resolved) for each input that exists on disk (a hub id or a model alias has nothing
    on disk to protect)."""
    for given in inputs:
        if given and Path(given).expanduser().exists():
            yield given, Path(given).expanduser().resolve()


def check_output_file(out: Path | str, inputs: list[Path | str | None]) -> None:
    """Refuse an output file that is an input file, or would replace a file inside an input folder
    (a new file beside a model, e.g. its predictions, is fine)."""
    out_path = Path(out).expanduser().resolve()
    for given, path in _on_disk(inputs):
        if out_path == path or (out_path.exists() and path in out_path.parents):
            raise SparseBertError(f"output {out} would replace the input {given}; choose another --output")


def is_sparsebert_output(path: Path) -> bool:
    """Whether sparsebert wrote this folder: only its marker counts (file names such as ``config.yaml``
    and ``log.jsonl`` are common enough that a user's own folder may hold them)."""
    return (path / MARKER).exists()


@contextmanager
def claimed_output_dir(path: Path | str, *, overwrite: bool, resume: bool) -> Iterator[Path]:
    """Hold the output folder for a whole run: locked, empty unless resumed, and ours to delete.

    A second run on the same folder is refused while the first holds the lock (naming its PID).
    ``overwrite`` deletes only what an earlier sparsebert run wrote there; a non-empty folder without
    sparsebert's marker is refused, never emptied nor resumed into (the marker is written only after
    this check, so a refused folder stays unmarked).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SparseBertError(f"output path {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path / LOCK)
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read(path / OWNER) or "unknown"
        raise SparseBertError(f"output directory {path} is in use by another sparsebert run (PID {holder})") from None
    except OSError as exc:
        raise SparseBertError(f"cannot write to output directory {path}: {exc.strerror}") from None
    try:
        (path / OWNER).write_text(str(os.getpid()))
        contents = [p for p in path.iterdir() if p.name not in (LOCK, OWNER)]
        if contents and not (overwrite or resume):
            raise SparseBertError(
                f"output directory {path} is not empty; pass --overwrite to replace it or --resume to continue"
            )
        if contents and not is_sparsebert_output(path):
            verb = "continue in it" if resume else "delete them"
            raise SparseBertError(
                f"output directory {path} holds files that sparsebert did not write; refusing to {verb}"
            )
        if contents and overwrite and not resume:
            for item in contents:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        (path / MARKER).touch()
        yield path
    finally:
        (path / OWNER).unlink(missing_ok=True)
        lock.release()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class JsonlLog:
    """Append-only JSON-lines log, flushed per record so an interrupted run keeps its history."""

    def __init__(self, path: Path | str, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")

    def read(self) -> list[dict]:
        """Every whole record; a line torn by a kill or damaged on disk is skipped (the log is a history,
        not a state: nothing is resumed from it)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def rewind(self, step: int) -> None:
        """On resuming from the checkpoint of ``step``: drop what the interrupted attempt logged about
        later steps (they run again), so that every step is logged once. A line torn by a kill goes too."""
        if not self.path.exists():
            return
        records = [r for r in self.read() if r.get("step") is None or isinstance(r["step"], (int, float))]
        kept = [r for r in records if r.get("step") is None or r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in kept))
