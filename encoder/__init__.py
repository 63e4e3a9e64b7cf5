"""cloze's encoder: a BERT-style model, its pretraining objectives and downstream heads.

Plain PyTorch (plus safetensors for checkpoints); it never imports ray or deepspeed.
"""

from .config import ConfigError, EncoderConfig, PRESETS
from .heads import DOWNSTREAM, OBJECTIVES, SequenceClassifier, TokenClassifier
from .heads.downstream import ClassifierOutput
from .masking import mask_tokens
from .model import Encoder, count_parameters, flops_per_token, init_weights
from .multi import MultiObjective, validate_weights
from .objective import ObjectiveOutput

__all__ = [
    "ConfigError", "EncoderConfig", "PRESETS", "Encoder", "MultiObjective", "ObjectiveOutput",
    "SequenceClassifier", "TokenClassifier", "ClassifierOutput", "OBJECTIVES", "DOWNSTREAM",
    "mask_tokens", "count_parameters", "flops_per_token", "init_weights", "validate_weights",
]
