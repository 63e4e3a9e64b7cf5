"""Next Sentence Prediction: 0 = B is the true continuation of A (IsNext), 1 = random (NotNext)."""

from .pair import PairObjective


class NSPObjective(PairObjective):
    name = "nsp"
    label_key = "nsp_label"
    own_pooler = False  # BERT's pooler + seq_relationship, as in BertForPreTraining
