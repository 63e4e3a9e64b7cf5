"""Sentence Order Prediction (ALBERT): 0 = A then B in document order, 1 = swapped."""

from .pair import PairObjective


class SOPObjective(PairObjective):
    name = "sop"
    label_key = "sop_label"
