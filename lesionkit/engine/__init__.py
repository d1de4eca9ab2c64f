"""Training, evaluation and checkpointing.

``config`` (what to train; knows no trainer) -> ``registry`` (which trainer: resolves the name,
loads the recipe's config class, builds the trainer) -> ``trainer`` (the generic loop and its
hooks) or a method trainer in ``trainers/``, with ``resume`` (checkpoint state), ``loaders``
(the epoch order), ``runtime`` (seeds, devices), ``run_log`` (log.csv, curves.png),
``checkpoint`` (files) and ``evaluation`` beside it. The layout: docs/engine.md.
"""

from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from lesionkit.engine.config import (
    CheckpointConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    TrainConfig,
)
from lesionkit.engine.evaluation import EvaluationResult, evaluate
from lesionkit.engine.registry import (
    TRAINER_MODULES,
    TRAINERS,
    build_trainer,
    get_trainer_class,
    load_train_config,
    register_trainer,
)
from lesionkit.engine.trainer import Stage, Trainer

__all__ = [
    "CheckpointConfig", "DataConfig", "EvaluationResult", "LossConfig", "ModelConfig", "OptimConfig", "SchedulerConfig",
    "Stage", "TRAINERS", "TRAINER_MODULES", "TrainConfig", "Trainer", "build_trainer", "evaluate", "get_trainer_class",
    "load_checkpoint", "load_train_config", "model_from_checkpoint", "register_trainer", "save_checkpoint",
]
