"""Crash-safe file output: everything lands under its final name only when complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def publish_dir(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` into ``target`` by rename, then remove ``staging``.

    Used for saved models: the files are complete before they appear under their final names.
    """
    target.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        dest = target / item.name
        if dest.is_dir() and item.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    staging.rmdir()


def prepare_output_dir(path: Path | str, *, overwrite: bool, resume: bool) -> Path:
    """Refuse a non-empty output folder unless the user asked to overwrite or resume it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SparseBertError(f"output path {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise SparseBertError(
            f"output directory {path} is not empty; pass --overwrite to replace it or --resume to continue"
        )
    if overwrite and not resume and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class JsonlLog:
    """Append-only JSON-lines log, flushed per record so an interrupted run keeps its history."""

    def __init__(self, path: Path | str, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
