"""Example builders: a unit's tokenized documents -> pretraining examples. Pure Python, no Ray.

They follow BERT's `create_pretraining_data.py`: target length `max_seq_len - 3` (or a
random shorter one with `short_seq_prob`, per document), chunks of whole sentences, A = a
random number of the chunk's sentences, pairs cut to fit by dropping tokens from the longer
side, front or back at random. One deliberate change: BERT forces "random next" for a chunk
of one sentence, which pushes NotNext above 50% and lets the model read the label off the
chunk's shape. Here the label is a fair coin drawn for every example, and a one-sentence
chunk is split inside the sentence (A = its first part), for both labels. A random B comes
from another document of the same unit (never the same document; units hold >= 16
documents where the input allows), and the chunk's unused sentences are put back, as in BERT.

A builder's randomness is the `random.Random` it is given (the stage seeds one per unit and
pass), so its examples are a function of (documents, seed). What it cannot use is counted
in `counts` (the manifest's "builder" table), never dropped silently.
"""

from __future__ import annotations

import random
from collections import Counter

from .tokenizer import SpecialIds

Doc = list[list[list[int]]]  # paragraphs of sentences of token ids
MAX_SHUFFLE_DRAWS = 32  # ShuffleBuilder: random orders drawn before a deterministic swap


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> int:
    """BERT's truncate_seq_pair, in place: drop from the longer side, front or back at
    random, until len(a) + len(b) <= max_tokens. Returns the number of tokens dropped."""
    dropped = 0
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
        dropped += 1
    return dropped


class _Builder:
    """Shared chunking of BERT's generator; subclasses turn chunks into examples."""

    label: str | None = None

    def __init__(self, max_seq_len: int, short_seq_prob: float, special: SpecialIds):
        self.max_seq_len = max_seq_len
        self.short_seq_prob = short_seq_prob
        self.cls, self.sep = special.cls, special.sep

    def pair(self, a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        """[CLS] A [SEP] B [SEP] and its token types (0 for [CLS] A [SEP], 1 for B [SEP])."""
        return [self.cls, *a, self.sep, *b, self.sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)

    def single(self, x: list[int]) -> tuple[list[int], list[int]]:
        return [self.cls, *x, self.sep], [0] * (len(x) + 2)

    def target_length(self, max_tokens: int, rng: random.Random) -> int:
        if rng.random() < self.short_seq_prob:
            return rng.randint(2, max_tokens)
        return max_tokens

    def __call__(self, docs: list[Doc], rng: random.Random, counts: Counter) -> list[tuple[list[int], list[int], int]]:
        """Examples (input_ids, token_type_ids, label) of a unit's documents, in order."""
        out: list[tuple[list[int], list[int], int]] = []
        for d in range(len(docs)):
            self.document(docs, d, rng, counts, out)
        return out

    def document(self, docs, d, rng, counts, out) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _ChunkPairBuilder(_Builder):
    """Chunks of whole sentences, split into A (first a_end sentences) and B (the rest)."""

    def chunk_split(self, chunk: list[list[int]], rng: random.Random, counts: Counter):
        """(A tokens, B tokens of the true continuation, a_end) or None for a 1-token chunk.

        A chunk of one sentence is cut inside it (a_end = 1, B = the sentence's rest)."""
        if len(chunk) >= 2:
            a_end = rng.randint(1, len(chunk) - 1)
            return [t for s in chunk[:a_end] for t in s], [t for s in chunk[a_end:] for t in s], a_end
        (only,) = chunk
        if len(only) < 2:
            counts["chunks_skipped_one_token"] += 1
            return None
        counts["chunks_split_inside_sentence"] += 1
        cut = rng.randint(1, len(only) - 1)
        return only[:cut], only[cut:], 1

    def document(self, docs, d, rng, counts, out) -> None:
        sentences = [s for para in docs[d] for s in para]
        max_tokens = self.max_seq_len - 3
        target = self.target_length(max_tokens, rng)
        chunk: list[list[int]] = []
        length = 0
        i = 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i])
            if i == len(sentences) - 1 or length >= target:
                i -= self.emit(docs, d, chunk, target, max_tokens, rng, counts, out)
                chunk, length = [], 0
            i += 1

    def emit(self, docs, d, chunk, target, max_tokens, rng, counts, out) -> int:
        """Append an example for `chunk`; return how many sentences to put back."""
        raise NotImplementedError  # pragma: no cover - abstract


class NspBuilder(_ChunkPairBuilder):
    """Next sentence prediction. nsp_label 0 = B is A's true continuation, 1 = B is random."""

    label = "nsp_label"

    def __call__(self, docs, rng, counts):
        if len(docs) < 2:  # no other document to draw a random B from
            counts["units_skipped_single_document"] += 1
            return []
        return super().__call__(docs, rng, counts)

    def emit(self, docs, d, chunk, target, max_tokens, rng, counts, out) -> int:
        split = self.chunk_split(chunk, rng, counts)
        if split is None:
            return 0
        a, b, a_end = split
        put_back = 0
        is_random = rng.random() < 0.5
        if is_random:
            other = rng.randrange(len(docs) - 1)
            other += other >= d  # never the same document
            source = [s for para in docs[other] for s in para]
            b = []
            for s in source[rng.randrange(len(source)):]:
                b.extend(s)
                if len(b) >= target - len(a):
                    break
            put_back = len(chunk) - a_end  # the chunk's unused sentences go back to the document
        counts["truncated_tokens"] += truncate_pair(a, b, max_tokens, rng)
        out.append((*self.pair(a, b), int(is_random)))
        return put_back


class SopBuilder(_ChunkPairBuilder):
    """Sentence order prediction (ALBERT): A, B consecutive in one document; sop_label 1 =
    swapped. B never comes from another document."""

    label = "sop_label"

    def emit(self, docs, d, chunk, target, max_tokens, rng, counts, out) -> int:
        split = self.chunk_split(chunk, rng, counts)
        if split is None:
            return 0
        a, b, _ = split
        counts["truncated_tokens"] += truncate_pair(a, b, max_tokens, rng)
        swapped = rng.random() < 0.5
        if swapped:
            a, b = b, a
        out.append((*self.pair(a, b), int(swapped)))
        return 0


class ShuffleBuilder(_Builder):
    """Sentence shuffling: one paragraph's sentences (a window of them that fits), in order
    or shuffled (shuffle_label 1). `[CLS] s1 s2 ... [SEP]`. A window of one sentence cannot be
    shuffled: it is counted (`windows_single_sentence`), not labeled. Nor can a window whose
    every order gives the same tokens (identical sentences, or [5] and [5, 5]): counted as
    `windows_unshuffleable`, for both labels (a label-0-only window would leak the label)."""

    label = "shuffle_label"

    def document(self, docs, d, rng, counts, out) -> None:
        max_tokens = self.max_seq_len - 2
        for para in docs[d]:
            window: list[list[int]] = []
            length = 0
            for s in para:
                if window and length + len(s) > max_tokens:
                    self.emit(window, rng, counts, out)
                    window, length = [], 0
                window.append(s)
                length += len(s)
            if window:
                self.emit(window, rng, counts, out)

    @staticmethod
    def _swappable(window: list[list[int]]) -> int | None:
        """An i whose neighbours i, i+1 give other tokens when swapped, or None: then every
        order gives the same tokens (if all neighbours commute, all sentences are powers of
        one word, so every permutation concatenates to the same list)."""
        for i in range(len(window) - 1):
            if window[i] + window[i + 1] != window[i + 1] + window[i]:
                return i
        return None

    def emit(self, window: list[list[int]], rng, counts, out) -> None:
        max_tokens = self.max_seq_len - 2
        if len(window) < 2:
            counts["windows_single_sentence"] += 1
            return
        swap = self._swappable(window)
        if swap is None:
            counts["windows_unshuffleable"] += 1
            return
        original = [t for s in window for t in s]
        shuffled = rng.random() < 0.5
        tokens = original
        if shuffled:  # a real permutation: the text must change
            for _ in range(MAX_SHUFFLE_DRAWS):
                order = list(range(len(window)))
                rng.shuffle(order)
                tokens = [t for i in order for t in window[i]]
                if tokens != original:
                    break
            else:  # every draw gave the original tokens (rare): swap two neighbours that differ
                counts["shuffle_draws_exhausted"] += 1
                order = list(range(len(window)))
                order[swap], order[swap + 1] = order[swap + 1], order[swap]
                tokens = [t for i in order for t in window[i]]
        counts["truncated_tokens"] += max(0, len(tokens) - max_tokens)
        out.append((*self.single(tokens[:max_tokens]), int(shuffled)))


class MlmBuilder(_Builder):
    """MLM only: `[CLS] text [SEP]` blocks of consecutive whole sentences of one document."""

    def document(self, docs, d, rng, counts, out) -> None:
        max_tokens = self.max_seq_len - 2
        target = self.target_length(max_tokens, rng)
        block: list[int] = []
        for s in (s for para in docs[d] for s in para):
            if block and len(block) + len(s) > target:
                out.append((*self.single(block), -1))
                block = []
            block.extend(s)
            if len(block) > max_tokens:
                counts["truncated_tokens"] += len(block) - max_tokens
                del block[max_tokens:]
        if block:
            out.append((*self.single(block), -1))


BUILDERS = {"nsp": NspBuilder, "sop": SopBuilder, "shuffle": ShuffleBuilder, "mlm": MlmBuilder}
