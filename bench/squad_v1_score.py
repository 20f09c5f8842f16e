"""Score a predictions file against a SQuAD v1.1 dataset file, independently of sparsebert.

The official v1.1 evaluation (Rajpurkar et al. 2016, ``evaluate-v1.1.py``) written out on its own, with no
sparsebert import: answers are lower-cased, stripped of punctuation and of the articles a/an/the, their
whitespace collapsed; exact match and token F1 take the best over a question's gold answers; every question of
the dataset counts, one without a prediction scoring 0. Figures are percentages, as the official script prints.

    python bench/squad_v1_score.py ../shared/data/squad/dev-articles-36-41.json m.predictions.json
    python bench/squad_v1_score.py DEV bf16.jsonl --against exact.jsonl   # also: how many answers differ

Predictions are ``{question id: answer text}`` JSON (``evaluate``'s ``predictions.json``) or JSON lines with
``id`` and ``answer`` (``sparsebert predict --task squad``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import string

PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(gold).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def score(dataset: dict, predictions: dict[str, str]) -> dict[str, float]:
    exact = f1 = total = 0.0
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                golds = [answer["text"] for answer in qa["answers"]]
                answer = predictions[qa["id"]]
                exact += max(float(normalize(answer) == normalize(gold)) for gold in golds)
                f1 += max(token_f1(answer, gold) for gold in golds)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def read_predictions(path: str) -> dict[str, str]:
    """{question id: answer text} from either layout (see the module's docstring)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and not {"id", "answer"} <= whole.keys():
        return whole
    lines = (json.loads(line) for line in text.splitlines() if line.strip())
    return {row["id"]: row["answer"] for row in lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="SQuAD v1.1 JSON")
    parser.add_argument("predictions", help="{question id: answer text} JSON, or JSON lines of {id, answer}")
    parser.add_argument("--against", help="another predictions file: also count the questions answered differently")
    args = parser.parse_args()
    with open(args.dataset, encoding="utf-8") as f:
        dataset = json.load(f)
    predictions = read_predictions(args.predictions)
    result = score(dataset, predictions)
    if args.against:
        other = read_predictions(args.against)
        result["answers_differing"] = sum(other.get(qid) != answer for qid, answer in predictions.items())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
