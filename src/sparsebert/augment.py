"""Word-replacement data augmentation for distillation: more inputs for the teacher to label.

On small tasks prune-while-distill runs out of data before it runs out of steps: on MRPC the
student's training loss keeps falling while its dev accuracy stalls (BENCHMARKS.md), and the
reference trains on TinyBERT's ~20x augmented data. TinyBERT replaces words by BERT-MLM predictions
or GloVe neighbours; MiniLM checkpoints have no MLM head and GloVe is not packaged, so here the
neighbours come from the model's own input word embeddings (cosine similarity among whole-word
vocabulary entries). A variant keeps its example's label, but the distilling strategies train on
the teacher's outputs for it, which is what makes a variant worth a step. It is meant for long runs:
at a CPU budget (MRPC, 90%, 912 steps) it left the student under-fitting and worse (BENCHMARKS.md).
"""

from __future__ import annotations

import random
import string

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from sparsebert.data import Example

REPLACE_PROBABILITY = 0.4  # TinyBERT's per-word replacement probability
NEIGHBOURS = 15  # TinyBERT's candidate count


class WordNeighbours:
    """The ``k`` nearest whole words of each vocabulary word in an input-embedding matrix."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, k: int = NEIGHBOURS):
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens)
        # alphabetic entries only: no "##" continuations, punctuation, numbers or [CLS]-style tokens
        self.words = sorted(w for w in vocab if w.isalpha() and len(w) > 1 and w not in special)
        self.index = {w: i for i, w in enumerate(self.words)}
        ids = torch.tensor([vocab[w] for w in self.words])
        self.vectors = F.normalize(embeddings.detach()[ids].float(), dim=-1)
        self.k = k
        self.table: dict[str, list[str]] = {}

    def prepare(self, words: set[str], chunk: int = 1024) -> None:
        """Look up many words in batched matrix products (one query at a time is ~100x slower)."""
        todo = sorted(w for w in words if w in self.index and w not in self.table)
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            rows = torch.tensor([self.index[w] for w in batch])
            sims = self.vectors[rows] @ self.vectors.T
            sims[torch.arange(len(batch)), rows] = -2.0  # never the word itself
            top = sims.topk(min(self.k, len(self.words) - 1), dim=-1).indices
            for word, neighbours in zip(batch, top.tolist(), strict=True):
                self.table[word] = [self.words[j] for j in neighbours]

    def __call__(self, word: str) -> list[str]:
        if word not in self.table:
            self.prepare({word})
        return self.table.get(word, [])


def _core(token: str) -> tuple[str, str, str]:
    """``"(good),"`` -> ``("(", "good", "),")``: the word and the punctuation around it."""
    core = token.strip(string.punctuation)
    if not core:
        return token, "", ""
    start = token.index(core)
    return token[:start], core, token[start + len(core) :]


def _lookup_key(core: str, neighbours: WordNeighbours) -> str:
    return core if core in neighbours.index else core.lower()


def augment_text(text: str, neighbours: WordNeighbours, rng: random.Random, p: float = REPLACE_PROBABILITY) -> str:
    """Replace each known word by one of its neighbours with probability ``p``."""
    out = []
    for token in text.split(" "):
        before, core, after = _core(token)
        candidates = neighbours(_lookup_key(core, neighbours)) if core and rng.random() < p else []
        out.append(before + rng.choice(candidates) + after if candidates else token)
    return " ".join(out)


def augment(
    examples: list[Example], neighbours: WordNeighbours, copies: int, seed: int = 0, p: float = REPLACE_PROBABILITY
) -> list[Example]:
    """The examples followed by ``copies`` augmented variants of each (every text of a pair is varied)."""
    words = {_lookup_key(_core(t)[1], neighbours) for e in examples for text in e.texts for t in text.split(" ")}
    neighbours.prepare(words)
    rng = random.Random(seed)
    variants = [
        Example(tuple(augment_text(text, neighbours, rng, p) for text in e.texts), e.label)
        for _ in range(copies)
        for e in examples
    ]
    return list(examples) + variants
