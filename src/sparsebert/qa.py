"""Extractive question answering (SQuAD v1.1): read the official JSON, cut it into windows, find the answers, score.

Pure functions, no model and no training loop, so that each step can be checked on its own:

* ``read_squad`` reads the official layout; every problem is a one-line ``SparseBertError`` naming the file and the
  question, because a bad ``answer_start`` silently trains the model on the wrong span.
* ``prepare_train_features`` / ``prepare_eval_features`` tokenise question + context into overlapping windows
  (``doc_stride`` tokens of overlap, the 🤗 meaning of the word) with a fast tokenizer, which alone gives the
  character offsets that tie tokens back to the context.
* ``postprocess`` turns start/end logits into the best span of each question, sliced from the original context by
  character offsets, so accents, CJK and the original case survive exactly.
* ``normalize_answer``, ``exact_match``, ``f1_score`` and ``squad_metrics`` follow the official v1.1 evaluation
  script, except that the scores are fractions in [0, 1] like every other sparsebert metric.

Features are not padded (``DataCollatorWithPadding`` pads each batch, as in ``data``); tokenizers that pad on the
left are refused, because left padding would shift the token positions of the answers.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from transformers import BatchEncoding, PreTrainedTokenizerBase

from sparsebert.errors import SparseBertError

# Keys of the evaluation features that only post-processing reads; ``model_inputs`` drops them before batching.
POSTPROCESS_KEYS = ("example_id", "example_index", "offset_mapping")


@dataclass(frozen=True)
class QAExample:
    """One question about one context; ``answers`` are (text, character offset of the text in the context)."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]


class QAPrediction(NamedTuple):
    """The best span of a question: ``context[char_start:char_end] == text``; score = start + end logit.

    A question with no valid span gets ``("", -inf, 0, 0)``.
    """

    text: str
    score: float
    char_start: int
    char_end: int


# -- reading ---------------------------------------------------------------------------------------


def _short(text: str, limit: int = 40) -> str:
    """A quoted, one-line excerpt of ``text`` for an error message (``repr`` escapes newlines)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _load_json(path: Path) -> Any:
    """The file's JSON (UTF-8, optional byte-order mark); any problem becomes one line naming the file."""
    if not path.is_file():
        raise SparseBertError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SparseBertError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SparseBertError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _field(obj: Any, key: str, kind: type, path: Path, where: str) -> Any:
    """``obj[key]``, checked to be a ``kind``: the message names the JSON path of what is missing or wrong."""
    if not isinstance(obj, dict):
        raise SparseBertError(f"{path}: not SQuAD JSON ({where} is {type(obj).__name__}, expected an object)")
    if key not in obj:
        raise SparseBertError(f"{path}: not SQuAD JSON ({where} has no {key!r})")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SparseBertError(
            f"{path}: not SQuAD JSON ({where}.{key} is {type(value).__name__}, expected {kind.__name__})"
        )
    return value


def _read_answers(qa: dict, context: str, path: Path, where: str, require_answers: bool) -> list[tuple[str, int]]:
    """A question's answers, each checked to point at its own text in the context."""
    qid = qa["id"]
    raw = _field(qa, "answers", list, path, where) if "answers" in qa else []
    if require_answers and not raw:
        hint = " (SQuAD v2 unanswerable questions are not supported)" if qa.get("is_impossible") else ""
        raise SparseBertError(f"{path}: question {qid} ({where}) has no answers; a training file needs one{hint}")
    answers = []
    for k, answer in enumerate(raw):
        at = f"{where}.answers[{k}]"
        text = _field(answer, "text", str, path, at)
        start = _field(answer, "answer_start", int, path, at)
        if not text:
            raise SparseBertError(f"{path}: question {qid} ({at}): the answer text is empty")
        found = context[start : start + len(text)] if start >= 0 else ""
        if found != text:
            raise SparseBertError(
                f"{path}: question {qid} ({at}): answer_start {start} does not point at its text {_short(text)} "
                f"(the context there reads {_short(found)})"
            )
        answers.append((text, start))
    return answers


def read_squad(path: str | Path, require_answers: bool) -> list[QAExample]:
    """Read an official SQuAD v1.1 file: ``data[].paragraphs[].{context, qas[].{id, question, answers[]}}``.

    ``require_answers=True`` (training files) refuses a question without answers: the model would learn nothing
    from it. Evaluation files may leave answers out (prediction only). Ids must be unique, since predictions and
    scores are keyed by id. Questions come back in file order.
    """
    path = Path(path)
    root = _load_json(path)
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise SparseBertError(f"{path}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    examples: list[QAExample] = []
    first_seen: dict[str, str] = {}
    for a, article in enumerate(root["data"]):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, path, where)
            for q, qa in enumerate(_field(paragraph, "qas", list, path, where)):
                at = f"{where}.qas[{q}]"
                qid = _field(qa, "id", str, path, at)
                question = _field(qa, "question", str, path, at)
                if qid in first_seen:
                    raise SparseBertError(f"{path}: duplicate question id {qid} ({at}, first at {first_seen[qid]})")
                first_seen[qid] = at
                answers = _read_answers(qa, context, path, at, require_answers)
                examples.append(QAExample(qid, question, context, answers))
    if not examples:
        raise SparseBertError(f"{path}: no questions")
    return examples


# -- windows ---------------------------------------------------------------------------------------


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Only a fast tokenizer gives character offsets; left padding would shift every answer position."""
    if not getattr(tokenizer, "is_fast", False):
        raise SparseBertError(
            f"question answering needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not one"
        )
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise SparseBertError(
            f"the tokenizer pads on the {tokenizer.padding_side}; question answering needs right padding "
            "(answer positions are token indexes, which left padding would shift)"
        )


def _check_room(
    examples: Sequence[QAExample], tokenizer: PreTrainedTokenizerBase, max_length: int, stride: int
) -> None:
    """Every window must hold more context tokens than the overlap, or the fast tokenizer panics (a Rust panic
    that ``except Exception`` does not catch): name the question that does not fit instead."""
    if stride < 0:
        raise SparseBertError(f"doc_stride must be 0 or more, not {stride}")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    questions = tokenizer([e.question.lstrip() for e in examples], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in questions]
    for example, n_question in zip(examples, lengths, strict=True):
        room = max_length - n_question - specials
        if room <= 0:
            raise SparseBertError(
                f"question {example.id}: the question is {n_question} tokens, which with {specials} special tokens "
                f"leaves no room for the context at max_length {max_length}"
            )
        if stride >= room:
            raise SparseBertError(
                f"question {example.id}: only {room} context tokens fit in a window at max_length {max_length}, "
                f"not more than doc_stride {stride} (lower doc_stride or raise max_length)"
            )


def _windows(
    examples: Sequence[QAExample], tokenizer: PreTrainedTokenizerBase, max_length: int, doc_stride: int
) -> BatchEncoding:
    """Question + context pairs cut into windows of at most ``max_length`` tokens; consecutive windows of a
    context share ``doc_stride`` tokens. Leading spaces of questions are dropped (they only waste tokens)."""
    _check_tokenizer(tokenizer)
    _check_room(examples, tokenizer, max_length, doc_stride)
    return tokenizer(
        [e.question.lstrip() for e in examples],
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def _model_features(encoding: BatchEncoding, i: int) -> dict:
    """Window ``i``'s model inputs (input_ids, attention_mask, token_type_ids where the tokenizer makes them)."""
    return {k: encoding[k][i] for k in encoding if k not in ("offset_mapping", "overflow_to_sample_mapping")}


def _answer_positions(
    sequence_ids: list[int | None], offsets: list[tuple[int, int]], start_char: int, end_char: int, cls_index: int
) -> tuple[int, int]:
    """Token positions of the first and last token of the answer, or (cls, cls) when the window does not hold the
    whole answer (🤗's convention: the model learns to point at CLS there, and post-processing never picks it)."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, end


def prepare_train_features(
    examples: Sequence[QAExample], tokenizer: PreTrainedTokenizerBase, max_length: int = 384, doc_stride: int = 128
) -> list[dict]:
    """Training windows, each ``{input_ids, attention_mask, [token_type_ids], start_positions, end_positions}``.

    A long context becomes several windows; each is labelled with the token span of the question's first answer,
    or with the CLS position (index 0 for BERT-family tokenizers) in both labels when the window does not contain
    the whole answer. Nothing is padded; the dicts go straight to ``DataCollatorWithPadding``.
    """
    encoding = _windows(examples, tokenizer, max_length, doc_stride)
    features = []
    for i, example_index in enumerate(encoding["overflow_to_sample_mapping"]):
        example = examples[example_index]
        if not example.answers:
            raise SparseBertError(f"question {example.id} has no answer to train on")
        text, start_char = example.answers[0]
        input_ids = encoding["input_ids"][i]
        cls_id = tokenizer.cls_token_id
        cls_index = input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0
        start, end = _answer_positions(
            encoding.sequence_ids(i), encoding["offset_mapping"][i], start_char, start_char + len(text), cls_index
        )
        features.append({**_model_features(encoding, i), "start_positions": start, "end_positions": end})
    return features


def prepare_eval_features(
    examples: Sequence[QAExample], tokenizer: PreTrainedTokenizerBase, max_length: int = 384, doc_stride: int = 128
) -> list[dict]:
    """Evaluation windows (the same as for training), each with what post-processing needs.

    Each dict holds the model inputs plus ``example_index`` (position in ``examples``), ``example_id`` and
    ``offset_mapping``: per token, the (start, end) character offsets in the context, or None for question and
    special tokens, so that no answer is ever taken from outside the context. ``model_inputs`` strips those keys
    before batching.
    """
    encoding = _windows(examples, tokenizer, max_length, doc_stride)
    features = []
    for i, example_index in enumerate(encoding["overflow_to_sample_mapping"]):
        offsets = [
            tuple(offset) if sequence == 1 else None
            for offset, sequence in zip(encoding["offset_mapping"][i], encoding.sequence_ids(i), strict=True)
        ]
        features.append(
            {
                **_model_features(encoding, i),
                "example_index": example_index,
                "example_id": examples[example_index].id,
                "offset_mapping": offsets,
            }
        )
    return features


def model_inputs(features: Sequence[dict]) -> list[dict]:
    """Evaluation features without the post-processing keys, ready for ``DataCollatorWithPadding`` (which cannot
    batch offsets that contain None)."""
    return [{k: v for k, v in f.items() if k not in POSTPROCESS_KEYS} for f in features]


# -- post-processing -------------------------------------------------------------------------------


def _best_span(
    offsets: list[tuple[int, int] | None], start_logits: Any, end_logits: Any, n_best: int, max_answer_length: int
) -> tuple[float, int, int] | None:
    """The best (score, char_start, char_end) of one window among its ``n_best`` starts x ``n_best`` ends.

    Logits past the window's own length (batch padding) are ignored; a span must lie in the context, not end before
    it starts, and be at most ``max_answer_length`` tokens. Ties keep the earlier position.
    """
    n = len(offsets)
    start = np.asarray(start_logits, dtype=np.float64)[:n]
    end = np.asarray(end_logits, dtype=np.float64)[:n]
    if len(start) < n or len(end) < n:
        raise ValueError(f"logits for {len(start)}/{len(end)} tokens, but the feature has {n} tokens")
    best = None
    for s in np.argsort(-start, kind="stable")[:n_best]:
        if offsets[s] is None:
            continue
        for e in np.argsort(-end, kind="stable")[:n_best]:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start[s] + end[e])
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best


def postprocess(
    examples: Sequence[QAExample],
    features: Sequence[dict],
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, QAPrediction]:
    """Each question's best answer over all its windows, as ``{id: (text, score, char_start, char_end)}``.

    ``features`` are ``prepare_eval_features(examples, ...)``; ``start_logits[i]`` / ``end_logits[i]`` are the
    model's logits for feature ``i`` (a 2-D array, or one 1-D array per feature: padded batches may differ in
    width). The text is the original context's characters between the offsets, never decoded tokens, so case,
    accents and CJK come back exactly. A question without any valid span gets the empty string.
    """
    if not len(start_logits) == len(end_logits) == len(features):
        raise ValueError(f"{len(features)} features but {len(start_logits)}/{len(end_logits)} rows of logits")
    best: dict[int, tuple[float, int, int]] = {}
    for i, feature in enumerate(features):
        index = feature["example_index"]
        if examples[index].id != feature["example_id"]:
            raise ValueError(f"feature {i} belongs to question {feature['example_id']}, not {examples[index].id}")
        span = _best_span(feature["offset_mapping"], start_logits[i], end_logits[i], n_best, max_answer_length)
        if span is not None and (index not in best or span[0] > best[index][0]):
            best[index] = span
    predictions = {}
    for index, example in enumerate(examples):
        if index in best:
            score, char_start, char_end = best[index]
            predictions[example.id] = QAPrediction(example.context[char_start:char_end], score, char_start, char_end)
        else:
            predictions[example.id] = QAPrediction("", float("-inf"), 0, 0)
    return predictions


# -- metrics (the official SQuAD v1.1 evaluation script) -------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalised strings (bag of tokens; 0.0 when nothing is shared, even both empty)."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` over ``examples``: per question the best score over its gold answers, averaged.

    Both are fractions in [0, 1] (EM 0.75, not the official script's 75.0), like the rest of sparsebert's metrics.
    As in the official script, a question without a prediction scores 0 and predictions for other ids are ignored.
    """
    if not examples:
        raise SparseBertError("no questions to score")
    em = f1 = 0.0
    for example in examples:
        golds = [text for text, _ in example.answers]
        if not golds:
            raise SparseBertError(f"question {example.id} has no gold answers to score against")
        if example.id not in predictions:
            continue
        prediction = predictions[example.id]
        em += max(exact_match(prediction, gold) for gold in golds)
        f1 += max(f1_score(prediction, gold) for gold in golds)
    return {"exact_match": em / len(examples), "f1": f1 / len(examples)}
