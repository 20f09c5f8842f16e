"""Compressed on-disk format for pruned models, and ``load`` for it (and for ordinary HF folders).

A pruned model saved by ``save_pretrained`` is a dense matrix full of zeros: no smaller than the original.
``export_compressed`` stores every prunable projection that is sparse enough as CSR in ``sparse.safetensors``
(per-row non-zero counts and column indices, both int16 whenever the matrix has fewer than 32768
columns, and fp32, fp16 or bf16 values) and everything else densely in ``dense.safetensors``, next to the HF
``config.json``, the tokenizer files and a small manifest (``sparsebert_manifest.json``). At 95% sparsity
a CSR matrix costs 0.05 * (2 + 4) bytes per weight instead of 4: ~13x smaller with fp32 values, ~20x
with fp16.

Why CSR and not a bitmask: the bitmask alone costs 1/8 byte per weight, which at 95% sparsity is more than
the values themselves in fp16 and caps the fp16 ratio below 18x; CSR is also what the runtime consumes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from sparsebert.errors import SparseBertError
from sparsebert.io import atomic_write_json, file_digest, publish_dir
from sparsebert.layers import find_prunable_linears
from sparsebert.sources import read_pretrained, resolve_model

MANIFEST = "sparsebert_manifest.json"
FORMAT = "sparsebert-csr"
FORMAT_VERSION = 1
# bf16: the weights exactly as the bf16 engine (--backend bf16) computes with them
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


@dataclass
class ExportReport:
    """Byte counts of one export (file sizes on disk, and the pruned matrices alone)."""

    output_dir: Path
    values: str
    sparse_matrices: int
    dense_matrices_kept: int
    pruned_sparsity: float
    pruned_dense_fp32_bytes: int  # what the exported matrices take as dense fp32
    pruned_sparse_bytes: int  # what they take in CSR
    source_bytes: int | None  # weight files of the source folder, when there was one
    output_bytes: int  # every file of the output folder

    @property
    def pruned_ratio(self) -> float:
        return self.pruned_dense_fp32_bytes / max(1, self.pruned_sparse_bytes)

    def as_dict(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        d["pruned_ratio"] = self.pruned_ratio
        return d


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _encode_csr(weight: torch.Tensor, values: torch.dtype) -> dict[str, torch.Tensor]:
    w = weight.detach().cpu()
    mask = w != 0
    # Row lengths rather than row pointers: they fit in int16 like the column indices (both are < columns).
    index_dtype = torch.int16 if w.shape[1] < 2**15 else torch.int32
    cols = mask.nonzero()[:, 1]
    return {"row_nnz": mask.sum(dim=1).to(index_dtype), "indices": cols.to(index_dtype), "values": w[mask].to(values)}


CHECKED_FILES = ("dense.safetensors", "sparse.safetensors", "config.json")


def _read_manifest(folder: Path) -> dict:
    """The manifest, checked: format, version, and each file's SHA-256 (a changed byte is refused)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparseBertError(f"{folder / MANIFEST}: not a valid manifest ({exc})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version", 0) > FORMAT_VERSION
    ):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SparseBertError(f"{folder}: unsupported compressed format {found}")
    for name, expected in manifest.get("sha256", {}).items():  # exports from before checksums have none
        if not (folder / name).is_file():
            raise SparseBertError(f"{folder / name}: missing from the compressed model")
        if file_digest(folder / name) != expected:
            raise SparseBertError(f"{folder / name}: checksum mismatch (the file is damaged or was changed)")
    return manifest


def _decode_csr(parts: dict[str, torch.Tensor], shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    rows = torch.repeat_interleave(torch.arange(shape[0]), parts["row_nnz"].to(torch.int64))
    cols = parts["indices"].to(torch.int64)
    dense = torch.zeros(shape, dtype=dtype)
    dense[rows, cols] = parts["values"].to(dtype)
    return dense


def _source_dir(model: nn.Module | str | os.PathLike) -> Path | None:
    if isinstance(model, nn.Module):
        return None
    path = Path(resolve_model(model))
    return path if path.is_dir() else None


def _folder_bytes(path: Path, only_weights: bool = False) -> int:
    files = [p for p in path.iterdir() if p.is_file()]
    if only_weights:
        files = [p for p in files if p.name.endswith(_SKIP_SUFFIXES)]
    return sum(p.stat().st_size for p in files)


@dataclass
class _Split:
    """A model's state divided for the export: CSR parts of the sparse matrices, everything else dense."""

    sparse: dict[str, torch.Tensor] = field(default_factory=dict)  # "<name>.row_nnz" etc.
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    matrices: dict[str, dict] = field(default_factory=dict)  # the manifest's entry of each CSR matrix
    aliases: dict[str, str] = field(default_factory=dict)  # tied weight -> the name it is stored under
    zeros: int = 0  # over the prunable matrices, CSR or not
    total: int = 0
    dense_fp32_bytes: int = 0  # of the CSR matrices, as dense fp32
    sparse_bytes: int = 0  # of the CSR matrices, as stored
    kept_dense: int = 0  # prunable matrices below min_sparsity

    @property
    def pruned_sparsity(self) -> float:
        return self.zeros / max(1, self.total)

    def add_prunable(self, name: str, tensor: torch.Tensor, values: str, min_sparsity: float) -> bool:
        """Count a prunable matrix's zeros and store it as CSR if sparse enough (False: it stays dense)."""
        n_zero = int((tensor == 0).sum())
        self.zeros, self.total = self.zeros + n_zero, self.total + tensor.numel()
        if n_zero / tensor.numel() < min_sparsity:
            self.kept_dense += 1
            return False
        parts = _encode_csr(tensor, VALUE_DTYPES[values])
        for part, t in parts.items():
            self.sparse[f"{name}.{part}"] = t.contiguous()
        self.matrices[name] = {"shape": list(tensor.shape), "nnz": int(parts["values"].numel()), "dtype": "fp32"}
        self.dense_fp32_bytes += tensor.numel() * 4
        self.sparse_bytes += sum(_tensor_bytes(t) for t in parts.values())
        return True


def _split_state(module: nn.Module, values: str, min_sparsity: float) -> _Split:
    """Divide ``module``'s state: prunable matrices with at least ``min_sparsity`` zeros as CSR, the rest
    dense, and each tied weight stored once (safetensors refuses shared storage)."""
    prunable = {f"{t.name}.weight" for t in find_prunable_linears(module)}
    split = _Split()
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            split.aliases[name] = seen[key]
            continue
        seen[key] = name
        if name in prunable and split.add_prunable(name, tensor, values, min_sparsity):
            continue
        split.dense[name] = tensor.detach().cpu().contiguous()
    return split


def _write_export(staging: Path, module: nn.Module, source: Path | None, split: _Split, values: str) -> None:
    """Fill ``staging`` with the exported folder: side files of ``source`` (tokenizer, ...), config, the two
    weight files and the manifest with their checksums."""
    if source is not None:  # tokenizer and other side files travel with the model
        for item in source.iterdir():
            if item.is_file() and item.name not in _WEIGHT_FILES and not item.name.endswith(_SKIP_SUFFIXES):
                shutil.copy2(item, staging / item.name)
    module.config.save_pretrained(staging)
    save_file(split.dense, staging / "dense.safetensors", metadata={"format": "pt"})
    save_file(split.sparse, staging / "sparse.safetensors", metadata={"format": "pt"})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": type(module).__name__,
        "values": values,
        "sparse": split.matrices,
        "aliases": split.aliases,
        "pruned_sparsity": split.pruned_sparsity,
        "sha256": {name: file_digest(staging / name) for name in CHECKED_FILES},
    }
    atomic_write_json(staging / MANIFEST, manifest)


def export_compressed(
    model: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    values: str = "fp32",
    min_sparsity: float = 0.5,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``model`` (a module, or a folder/name ``load`` understands) in the compressed format.

    Only the prunable projections with at least ``min_sparsity`` zeros are stored as CSR: below about
    one half, CSR with fp32 values is no smaller than the dense matrix.
    """
    if values not in VALUE_DTYPES:
        raise SparseBertError(f"--values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    source = _source_dir(model)
    module = load(source) if source is not None else model
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise SparseBertError(f"output folder {output_dir} is not empty (use --overwrite)")
    split = _split_state(module, values, min_sparsity)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        dir=output_dir.parent, prefix=f".{output_dir.name}.", ignore_cleanup_errors=True
    ) as tmp:
        _write_export(Path(tmp), module, source, split, values)
        publish_dir(Path(tmp), output_dir)
    return ExportReport(
        output_dir=output_dir,
        values=values,
        sparse_matrices=len(split.matrices),
        dense_matrices_kept=split.kept_dense,
        pruned_sparsity=split.pruned_sparsity,
        pruned_dense_fp32_bytes=split.dense_fp32_bytes,
        pruned_sparse_bytes=split.sparse_bytes,
        source_bytes=_folder_bytes(source, only_weights=True) if source is not None else None,
        output_bytes=_folder_bytes(output_dir),
    )


def is_compressed(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _model_class(config, architecture: str | None):
    name = architecture or (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise SparseBertError(f"cannot rebuild architecture {name!r}: not a transformers model class")
    return cls


def load(path: str | os.PathLike) -> nn.Module:
    """Load a model folder: the compressed format, or an ordinary HF folder (or alias such as ``minilm-l6``).

    The model comes back in eval mode with dense weights (pruned entries exactly zero); call
    ``sparsebert.runtime.sparsify`` on it for the fast sparse CPU kernels.
    """
    folder = Path(resolve_model(path))
    if not is_compressed(folder):
        config = read_pretrained(AutoConfig.from_pretrained, str(folder))
        cls = _model_class(config, None) if config.architectures else transformers.AutoModel
        return read_pretrained(cls.from_pretrained, str(folder)).eval()
    manifest = _read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    model = _model_class(config, manifest.get("architecture"))(config)
    try:
        state = load_file(folder / "dense.safetensors")
        sparse = load_file(folder / "sparse.safetensors")
        for name, meta in manifest["sparse"].items():
            parts = {p: sparse[f"{name}.{p}"] for p in ("row_nnz", "indices", "values")}
            state[name] = _decode_csr(parts, meta["shape"], torch.float32)
    except (OSError, KeyError, IndexError, RuntimeError, SafetensorError) as exc:
        raise SparseBertError(
            f"{folder}: the compressed weights cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    for name, target in manifest.get("aliases", {}).items():
        state[name] = state[target]
    result = model.load_state_dict(state, strict=False)
    missing = result.missing_keys
    if missing or result.unexpected_keys:
        raise SparseBertError(
            f"{folder}: weights do not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()
