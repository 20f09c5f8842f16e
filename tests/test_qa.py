"""Extractive question answering: reading SQuAD JSON, windows and their labels, post-processing, the official metric.

Every case is tiny and hand-worked, with a WordPiece vocabulary in which each word is one token, so that token
positions can be counted on the fingers. One test reads the real dev split in ../shared when it is there.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
from transformers import BertTokenizerFast, DataCollatorWithPadding

from sparsebert.errors import SparseBertError
from sparsebert.qa import (
    QAExample,
    QAPrediction,
    exact_match,
    f1_score,
    model_inputs,
    normalize_answer,
    postprocess,
    prepare_eval_features,
    prepare_train_features,
    read_squad,
    squad_metrics,
)

WORDS = [f"w{i}" for i in range(30)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "where", "is", "it", "zurich", "in", "switzerland", "a",
         "naive", "cafe", ",", ".", "?", *WORDS]  # fmt: skip
DEV_SPLIT = "shared/data/squad/dev-articles-36-41.json"


def make_tokenizer(**kwargs) -> BertTokenizerFast:
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizerFast:
    return make_tokenizer()


def one_line_error(call, *needles: str) -> str:
    """Run ``call``; it must raise a one-line SparseBertError that contains every needle."""
    with pytest.raises(SparseBertError) as exc:
        call()
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# -- the official metric ---------------------------------------------------------------------------


def test_normalize_answer_lowercases_drops_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre and anthem") == "theatre and anthem"  # articles only as whole words
    assert normalize_answer("Levi's Stadium.") == "levis stadium"  # punctuation removed before articles
    assert normalize_answer("  Zürich\t\ncafé ") == "zürich café"


def test_exact_match_and_f1_worked_by_hand():
    assert exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 2·(2/3)·1 / (5/3) = 0.8
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # pred {santa, clara, california}, gold {levis, stadium, in, santa, clara}: P = 2/3, R = 2/5, F1 = 0.5
    assert f1_score("Santa Clara, California", "Levi's Stadium in Santa Clara") == pytest.approx(0.5)
    # tokens are a bag: {cat: 2, dog: 1} ∩ {cat: 1, dog: 2} = 2 shared; P = R = 2/3
    assert f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert f1_score("golden", "gold") == 0.0
    # the official script's quirk: two answers that normalise to nothing match exactly but share no token
    assert exact_match("The", "a") == 1.0 and f1_score("The", "a") == 0.0


def test_squad_metrics_max_over_gold_answers_and_fractions():
    examples = [
        QAExample("q1", "?", "", [("Denver Broncos", 0), ("The Denver Broncos", 0)]),
        QAExample("q2", "?", "", [("Santa Clara", 0), ("Levi's Stadium in Santa Clara", 0)]),
        QAExample("q3", "?", "", [("gold", 0)]),
        QAExample("q4", "?", "", [("1996", 0)]),  # no prediction: scores 0, as in the official script
    ]
    predictions = {"q1": "denver broncos", "q2": "Santa Clara, California", "q3": "golden", "other": "ignored"}
    scores = squad_metrics(predictions, examples)
    # EM: 1 + 0 + 0 + 0 over 4; F1: 1 + max(0.8, 0.5) + 0 + 0 over 4 — fractions, not percentages
    assert scores == {"exact_match": pytest.approx(0.25), "f1": pytest.approx(0.45)}
    one_line_error(lambda: squad_metrics({}, []), "no questions")
    one_line_error(lambda: squad_metrics({"q": "x"}, [QAExample("q", "?", "c", [])]), "q", "no gold answers")


# -- reading SQuAD JSON ----------------------------------------------------------------------------


def squad_json() -> dict:
    """One article in the official layout, with several answers per question and non-ASCII text."""
    context = "Zürich is the largest city in Switzerland. It has a naïve café."
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Zürich",
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {
                                "answers": [
                                    {"answer_start": 0, "text": "Zürich"},
                                    {"answer_start": 0, "text": "Zürich"},
                                    {"answer_start": 30, "text": "Switzerland"},
                                ],
                                "question": "Which city is the largest?",
                                "id": "5733be284776f41900661182",
                            },
                            {
                                "answers": [{"answer_start": 52, "text": "naïve café"}],
                                "question": "What kind of café?",
                                "id": "5733be284776f41900661183",
                            },
                        ],
                    },
                    {"context": "A second paragraph.", "qas": []},
                ],
            }
        ],
    }


def write_json(path: Path, obj, bom: bool = False) -> Path:
    path.write_text(("\ufeff" if bom else "") + json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def test_read_squad_reads_the_official_layout(tmp_path):
    examples = read_squad(write_json(tmp_path / "train.json", squad_json(), bom=True), require_answers=True)
    assert [e.id for e in examples] == ["5733be284776f41900661182", "5733be284776f41900661183"]
    first, second = examples
    assert first.question == "Which city is the largest?"
    assert first.answers == [("Zürich", 0), ("Zürich", 0), ("Switzerland", 30)]
    assert second.answers == [("naïve café", 52)]
    assert second.context[52:62] == "naïve café"


def _drop_answers(d):
    d["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []


def _shift_answer(d):
    d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 51


def _duplicate_id(d):
    d["data"][0]["paragraphs"][1]["qas"] = [dict(d["data"][0]["paragraphs"][0]["qas"][0])]


def _no_context(d):
    del d["data"][0]["paragraphs"][0]["context"]


def _string_start(d):
    d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = "0"


@pytest.mark.parametrize(
    ("break_it", "needles"),
    [
        (_drop_answers, ["question 5733be284776f41900661183", "has no answers"]),
        (_shift_answer, ["5733be284776f41900661183", "answer_start 51 does not point at its text 'naïve café'"]),
        (_duplicate_id, ["duplicate question id 5733be284776f41900661182", "first at data[0].paragraphs[0].qas[0]"]),
        (_no_context, ["not SQuAD JSON", "data[0].paragraphs[0] has no 'context'"]),
        (_string_start, ["answer_start is str, expected int"]),
        (lambda d: d.pop("data"), ["not SQuAD JSON", "'data' list"]),
        (lambda d: d.update(data=[]), ["no questions"]),
    ],
)
def test_read_squad_errors_are_one_line_naming_file_and_question(tmp_path, break_it, needles):
    data = squad_json()
    break_it(data)
    path = write_json(tmp_path / "bad.json", data)
    one_line_error(lambda: read_squad(path, require_answers=True), str(path), *needles)


def test_read_squad_rejects_files_that_are_not_squad_json(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [\n  {"paragraphs": }\n]}')
    one_line_error(lambda: read_squad(broken, require_answers=False), f"{broken}:2: not valid JSON")
    a_list = write_json(tmp_path / "list.json", [1, 2])
    one_line_error(lambda: read_squad(a_list, require_answers=False), str(a_list), "not SQuAD JSON")
    one_line_error(lambda: read_squad(tmp_path / "missing.json", require_answers=False), "file not found")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"data": ["Zürich"]}'.encode("latin-1"))
    one_line_error(lambda: read_squad(latin1, require_answers=False), str(latin1), "not UTF-8")


def test_questions_without_answers_are_fine_for_prediction(tmp_path):
    data = squad_json()
    _drop_answers(data)
    del data["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    examples = read_squad(write_json(tmp_path / "test.json", data), require_answers=False)
    assert [e.answers for e in examples] == [[], []]


# -- windows ---------------------------------------------------------------------------------------

# "where is it" is 3 tokens; with [CLS] and two [SEP], max_length 16 leaves 10 context tokens per window, and a
# stride (overlap) of 4 moves each window on by 6: the 22 words make windows w0-w9, w6-w15, w12-w21.
LONG = QAExample("long", "where is it", " ".join(WORDS[:22]), [("w8 w9 w10 w11", len(" ".join(WORDS[:8])) + 1)])


def test_answer_across_a_window_boundary_is_labelled_in_the_window_that_holds_it_whole(tokenizer):
    assert LONG.context[LONG.answers[0][1] :].startswith("w8 w9 w10 w11")
    features = prepare_train_features([LONG], tokenizer, max_length=16, doc_stride=4)
    tokens = [tokenizer.convert_ids_to_tokens(f["input_ids"]) for f in features]
    assert [t[5] for t in tokens] == ["w0", "w6", "w12"]  # [CLS] where is it [SEP] come first
    assert all(len(t) == 16 for t in tokens)
    # window 1 (w0-w9) has only w8 w9 of the answer: CLS; window 2 has it whole at 5 + (8 - 6) = 7 .. 10
    labels = [(f["start_positions"], f["end_positions"]) for f in features]
    assert labels == [(0, 0), (7, 10), (0, 0)]
    assert tokens[1][7:11] == ["w8", "w9", "w10", "w11"]
    assert set(features[0]) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}


def test_windows_of_several_questions_and_an_answer_in_the_first_window(tokenizer):
    short = QAExample("short", "where is zurich?", "Zürich is in Switzerland.", [("Switzerland", 13)])
    features = prepare_train_features([short, LONG], tokenizer, max_length=16, doc_stride=4)
    assert len(features) == 1 + 3
    tokens = tokenizer.convert_ids_to_tokens(features[0]["input_ids"])
    assert tokens[features[0]["start_positions"]] == tokens[features[0]["end_positions"]] == "switzerland"
    assert (features[2]["start_positions"], features[2]["end_positions"]) == (7, 10)


def test_eval_features_keep_offsets_of_context_tokens_only(tokenizer):
    features = prepare_eval_features([LONG], tokenizer, max_length=16, doc_stride=4)
    assert [(f["example_index"], f["example_id"]) for f in features] == [(0, "long")] * 3
    for feature in features:
        offsets = feature["offset_mapping"]
        assert offsets[:5] == [None] * 5 and offsets[-1] is None  # [CLS], the question, [SEP]s
        words = [LONG.context[s:e] for s, e in offsets[5:-1]]
        assert words == tokenizer.convert_ids_to_tokens(feature["input_ids"])[5:-1]
    # both kinds of features batch with the ordinary collator once the post-processing keys are dropped
    collator = DataCollatorWithPadding(tokenizer)
    batch = collator(model_inputs(features))
    assert tuple(batch["input_ids"].shape) == (3, 16)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    train = collator(prepare_train_features([LONG], tokenizer, max_length=16, doc_stride=4))
    assert train["start_positions"].tolist() == [0, 7, 0]


def test_window_errors_are_one_line(tokenizer):
    slow = types.SimpleNamespace(is_fast=False, padding_side="right")
    one_line_error(lambda: prepare_train_features([LONG], slow), "needs a fast tokenizer")
    left = make_tokenizer(padding_side="left")
    one_line_error(lambda: prepare_eval_features([LONG], left, 16, 4), "pads on the left", "needs right padding")
    long_question = QAExample("q-long", " ".join(WORDS[:14]), "w0 w1", [("w1", 3)])
    one_line_error(
        lambda: prepare_train_features([long_question], tokenizer, max_length=16, doc_stride=0),
        "question q-long",
        "no room for the context at max_length 16",
    )
    one_line_error(
        lambda: prepare_eval_features([LONG], tokenizer, max_length=16, doc_stride=10),
        "question long",
        "only 10 context tokens fit",
        "doc_stride 10",
    )


# -- post-processing -------------------------------------------------------------------------------

ACCENTS = QAExample(
    "accents", "where is zurich?", "Zürich is in Switzerland, a naïve café. 我住在北京。", [("Zürich", 0)]
)


def logits_at(feature: dict, positions: dict[int, float], width: int | None = None) -> np.ndarray:
    row = np.zeros(width or len(feature["input_ids"]))
    for position, value in positions.items():
        row[position] = value
    return row


def position_of(feature: dict, context: str, text: str) -> int:
    """The token whose characters in the context are ``text``."""
    return next(i for i, o in enumerate(feature["offset_mapping"]) if o is not None and context[o[0] : o[1]] == text)


@pytest.mark.parametrize(
    ("first", "last", "answer"),
    [
        ("Zürich", "Zürich", "Zürich"),
        ("naïve", "café", "naïve café"),
        ("北", "京", "北京"),
        ("Zürich", "Switzerland", "Zürich is in Switzerland"),
    ],
)
def test_postprocess_slices_the_original_context(tokenizer, first, last, answer):
    features = prepare_eval_features([ACCENTS], tokenizer, max_length=64, doc_stride=8)
    (feature,) = features
    assert tokenizer.convert_ids_to_tokens(feature["input_ids"])[6] == "zurich"  # lower-cased, accent stripped
    s, e = position_of(feature, ACCENTS.context, first), position_of(feature, ACCENTS.context, last)
    prediction = postprocess([ACCENTS], features, [logits_at(feature, {s: 5.0})], [logits_at(feature, {e: 4.0})])
    text, score, char_start, char_end = prediction["accents"]
    assert text == answer and ACCENTS.context[char_start:char_end] == answer
    assert score == pytest.approx(9.0)


def test_postprocess_never_answers_from_the_question_or_special_tokens(tokenizer):
    features = prepare_eval_features([ACCENTS], tokenizer, max_length=64, doc_stride=8)
    (feature,) = features
    n = len(feature["input_ids"])
    target = position_of(feature, ACCENTS.context, "Switzerland")
    # [CLS] (0), the question's "zurich" (3) and the final [SEP] score highest, but only context tokens count
    start = logits_at(feature, {0: 9.0, 3: 8.0, n - 1: 7.0, target: 1.0})
    end = logits_at(feature, {0: 9.0, 3: 8.0, n - 1: 7.0, target: 1.0})
    assert postprocess([ACCENTS], features, [start], [end])["accents"].text == "Switzerland"


def test_postprocess_respects_max_answer_length_and_n_best(tokenizer):
    features = prepare_eval_features([ACCENTS], tokenizer, max_length=64, doc_stride=8)
    (feature,) = features
    at = {w: position_of(feature, ACCENTS.context, w) for w in ("Zürich", "is", "in", "Switzerland", "naïve")}
    start = logits_at(feature, {at["Zürich"]: 5.0})
    end = logits_at(feature, {at["Switzerland"]: 5.0, at["is"]: 4.0})
    # Zürich .. Switzerland is 4 tokens
    assert postprocess([ACCENTS], features, [start], [end], max_answer_length=4)["accents"].text == (
        "Zürich is in Switzerland"
    )
    assert postprocess([ACCENTS], features, [start], [end], max_answer_length=3)["accents"].text == "Zürich is"
    # the best start (naïve) comes after every good end; the second-best start is only seen with n_best >= 2
    start = logits_at(feature, {at["naïve"]: 9.0, at["in"]: 3.0})
    end = logits_at(feature, {at["Switzerland"]: 5.0})
    none = postprocess([ACCENTS], features, [start], [end], n_best=1)["accents"]
    assert none == QAPrediction("", float("-inf"), 0, 0)
    found = postprocess([ACCENTS], features, [start], [end], n_best=2)["accents"]
    assert found == QAPrediction("in Switzerland", 8.0, 10, 24)


def test_postprocess_picks_the_best_window_and_ignores_batch_padding(tokenizer):
    examples = [ACCENTS, LONG]
    features = prepare_eval_features(examples, tokenizer, max_length=16, doc_stride=4)
    windows = [i for i, f in enumerate(features) if f["example_id"] == "long"]
    assert len(windows) == 3 and windows == list(range(len(features) - 3, len(features)))
    width = 20  # one padded batch: every row is wider than its feature, and the padding holds huge logits
    start, end = np.full((len(features), width), 100.0), np.full((len(features), width), 100.0)
    for i, feature in enumerate(features):
        start[i, : len(feature["input_ids"])] = 0.0
        end[i, : len(feature["input_ids"])] = 0.0
    # question "long": w8 .. w9 in window 1 (score 2), w13 .. w14 in window 2 (score 3), w17 in window 3 (2.5)
    for window, first, last, value in [(0, "w8", "w9", 1.0), (1, "w13", "w14", 1.5), (2, "w17", "w17", 1.25)]:
        i = windows[window]
        start[i, position_of(features[i], LONG.context, first)] = value
        end[i, position_of(features[i], LONG.context, last)] = value
    predictions = postprocess(examples, features, start, end)
    assert predictions["long"].text == "w13 w14" and predictions["long"].score == pytest.approx(3.0)
    assert LONG.context[predictions["long"].char_start : predictions["long"].char_end] == "w13 w14"
    with pytest.raises(ValueError, match=f"{len(features)} features"):
        postprocess(examples, features, start[:-1], end)


# -- the real dev split ----------------------------------------------------------------------------


def _dev_split() -> Path | None:
    """../shared/... next to this checkout, or shared/... inside it (the device machine's copy)."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (root.parent / DEV_SPLIT, root / DEV_SPLIT):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.skipif(_dev_split() is None, reason=f"{DEV_SPLIT} is not here")
def test_real_dev_split_reads_whole():
    examples = read_squad(_dev_split(), require_answers=True)
    assert len(examples) == 1302
    assert len({e.id for e in examples}) == 1302
    for example in examples:
        assert example.answers
        for text, start in example.answers:
            assert example.context[start : start + len(text)] == text
    assert examples[0].answers[2] == ("元朝", 27)  # CJK in the first question of Yuan_dynasty


@pytest.mark.skipif(_dev_split() is None, reason=f"{DEV_SPLIT} is not here")
def test_real_dev_split_labels_round_trip_through_postprocess():
    """Logits that point exactly at the training labels must give back the gold answers: labels, offsets and
    post-processing agree on real text. The few misses are gold answers that begin inside a word (e.g. "h
    International Criminal Court ..."), which no token span can reproduce."""
    from sparsebert.models import load_tokenizer

    examples = read_squad(_dev_split(), require_answers=True)
    tokenizer = load_tokenizer("minilm-l6")
    train, features = prepare_train_features(examples, tokenizer), prepare_eval_features(examples, tokenizer)
    assert len(train) == len(features) > len(examples)  # some contexts need a second window at 384 tokens
    starts, ends = [], []
    for labelled, feature in zip(train, features, strict=True):
        start, end = np.zeros(len(feature["input_ids"])), np.zeros(len(feature["input_ids"]))
        if labelled["start_positions"] != 0:
            start[labelled["start_positions"]] = end[labelled["end_positions"]] = 10.0
        starts.append(start)
        ends.append(end)
    predictions = postprocess(examples, features, starts, ends)
    scores = squad_metrics({qid: p.text for qid, p in predictions.items()}, examples)
    assert scores["exact_match"] > 0.99 and scores["f1"] > 0.99


def test_the_report_counts_the_span_head_at_every_token():
    from transformers import BertConfig

    from sparsebert.report import flops_per_sequence

    qa = BertConfig(hidden_size=32, num_hidden_layers=2, architectures=["BertForQuestionAnswering"])
    label = BertConfig(hidden_size=32, num_hidden_layers=2, architectures=["BertForSequenceClassification"])
    body = 2 * 1000 * 64 + 2 * 2 * 2 * 64 * 64 * 32  # linears (1,000 nonzeros) and attention at 64 tokens
    assert flops_per_sequence(qa, 1000, 64) == body + 2 * 32 * 2 * 64
    assert flops_per_sequence(label, 1000, 64) == body + 2 * 32 * 32 + 2 * 32 * 2


def test_a_span_model_trained_elsewhere_reads_squad_windows_not_its_tokenizers_limit():
    """A hub QA model's tokenizer says 512 (BERT's positions); SQuAD models are trained on 384-token
    windows, and sparsebert's own save their length and stride."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForQuestionAnswering

    from sparsebert.models import inference_length

    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        architectures=["BertForQuestionAnswering"])  # fmt: skip
    model = BertForQuestionAnswering(config)
    tokenizer = SimpleNamespace(model_max_length=512)
    assert inference_length(None, tokenizer, model, 384) == 384
    model.config.sparsebert_doc_stride = 128  # trained by sparsebert: its saved length holds
    assert inference_length(None, tokenizer, model, 384) == 512
    assert inference_length(256, tokenizer, model, 384) == 256
