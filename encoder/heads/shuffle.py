"""Shuffle detection: 0 = a paragraph's sentences in their original order, 1 = shuffled."""

from .pair import PairObjective


class ShuffleObjective(PairObjective):
    name = "shuffle"
    label_key = "shuffle_label"
