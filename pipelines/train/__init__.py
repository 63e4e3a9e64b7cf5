"""The training core: one loop for every task (Ray Train + DeepSpeed ZeRO, checkpoints,
metrics, exact resume, export). A task (pretraining, fine-tuning) implements `Task`."""

from .config import OptimizerConfig, TrainConfig, check_resources, check_storage
from .launch import TrainResult, fit
from .task import Callback, Task

__all__ = ["Callback", "OptimizerConfig", "Task", "TrainConfig", "TrainResult", "check_resources", "check_storage",
           "fit"]
