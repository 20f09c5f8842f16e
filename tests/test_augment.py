"""Word-replacement augmentation: neighbours from input embeddings, punctuation kept, labels kept."""

import random

import torch
from transformers import BertTokenizerFast

from sparsebert.augment import WordNeighbours, augment, augment_text
from sparsebert.data import Example

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "movie", "film", "##s", ",", "a"]
VECTORS = {  # good~great and movie~film are near each other; bad is nearest to great
    "good": [1.0, 0.0, 0.0],
    "great": [0.9, 0.3, 0.0],
    "bad": [0.0, 1.0, 0.0],
    "movie": [0.0, 0.0, 1.0],
    "film": [0.1, 0.0, 0.95],
}


def neighbours(k: int = 1) -> WordNeighbours:
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    embeddings = torch.full((len(WORDS), 3), -1.0)
    for word, vector in VECTORS.items():
        embeddings[WORDS.index(word)] = torch.tensor(vector)
    return WordNeighbours(tokenizer, embeddings, k=k)


def test_neighbours_are_the_nearest_whole_words():
    n = neighbours()
    assert set(n.words) == set(VECTORS)  # no specials, "##" pieces, punctuation or 1-letter words
    assert (n("good"), n("movie"), n("bad"), n("unknown")) == (["great"], ["film"], ["great"], [])
    assert neighbours(k=2)("good") == ["great", "film"]


def test_replacement_keeps_punctuation_and_unknown_words():
    n = neighbours()
    rng = random.Random(0)
    assert augment_text("Good movie, (bad)! zzz", n, rng, p=1.0) == "great film, (great)! zzz"
    assert augment_text("good movie", n, rng, p=0.0) == "good movie"


def test_augment_appends_varied_copies_with_the_labels():
    examples = [Example(("good movie", "bad film"), 1), Example(("a great film",), 0)]
    out = augment(examples, neighbours(k=3), copies=2, seed=1)
    assert len(out) == 6 and out[:2] == examples
    assert [e.label for e in out] == [1, 0, 1, 0, 1, 0]
    assert all(len(v.texts) == len(e.texts) for v, e in zip(out[2:], examples * 2, strict=True))
    assert any(v.texts != e.texts for v, e in zip(out[2:], examples * 2, strict=True))
    assert augment(examples, neighbours(k=3), copies=2, seed=1) == out  # seeded
