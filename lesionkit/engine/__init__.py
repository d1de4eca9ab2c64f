"""Training, evaluation and checkpointing."""

from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from lesionkit.engine.config import DataConfig, LossConfig, ModelConfig, OptimConfig, SchedulerConfig, TrainConfig
from lesionkit.engine.evaluation import EvaluationResult, evaluate
from lesionkit.engine.trainer import TRAINERS, Stage, Trainer, build_trainer, get_trainer_class, load_train_config, register_trainer

__all__ = [
    "DataConfig", "EvaluationResult", "LossConfig", "ModelConfig", "OptimConfig", "SchedulerConfig", "Stage",
    "TRAINERS", "TrainConfig", "Trainer", "build_trainer", "evaluate", "get_trainer_class", "load_checkpoint",
    "load_train_config", "model_from_checkpoint",
    "register_trainer", "save_checkpoint",
]
