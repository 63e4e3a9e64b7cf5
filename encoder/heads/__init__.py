"""Heads by name. Pretraining objectives (`OBJECTIVES`) and downstream classifiers."""

from .mlm import MLMHead, MLMObjective
from .nsp import NSPObjective
from .rtd import RTDObjective
from .sequence import SequenceClassifier
from .shuffle import ShuffleObjective
from .sop import SOPObjective
from .token import TokenClassifier

OBJECTIVES = {
    "mlm": MLMObjective,
    "nsp": NSPObjective,
    "sop": SOPObjective,
    "shuffle": ShuffleObjective,
    "rtd": RTDObjective,
}

DOWNSTREAM = {"sequence": SequenceClassifier, "token": TokenClassifier}

__all__ = ["OBJECTIVES", "DOWNSTREAM", "MLMHead", "MLMObjective", "NSPObjective", "SOPObjective",
           "ShuffleObjective", "RTDObjective", "SequenceClassifier", "TokenClassifier"]
