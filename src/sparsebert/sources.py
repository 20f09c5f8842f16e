"""Where a model comes from: the packaged aliases, a local folder, or a Hugging Face hub id.

Both the model loaders (``models``) and the compressed format (``export``) resolve names and read
through transformers here, so neither imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError

from sparsebert.errors import SparseBertError
from sparsebert.packaged import minilm_l3_path, minilm_l6_path, mpnet_base_path

ALIASES = {"minilm-l6": minilm_l6_path, "minilm-l3": minilm_l3_path, "mpnet-base": mpnet_base_path}


def resolve_model(name: str | os.PathLike) -> str:
    """Return a local folder or a hub id for ``name``."""
    name = str(name)
    if name in ALIASES:
        return str(ALIASES[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SparseBertError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise SparseBertError(f"model path {name} does not exist or is not a folder")
    return name  # a hub id such as "bert-base-uncased" or "google/electra-small-discriminator"


def read_pretrained(fn, name: str, **kwargs):
    """Load through transformers; every failure to read the files becomes a one-line error."""
    try:
        return fn(name, **kwargs)
    except SafetensorError as exc:
        raise SparseBertError(f"could not read the weights of {name} (damaged or truncated file?): {exc}") from None
    except OSError as exc:
        where = "" if Path(name).is_dir() else " (not a local folder; hub said)"
        raise SparseBertError(f"could not load model {name!r}{where}: {exc}") from None
