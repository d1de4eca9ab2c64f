"""The trainer registry: ``trainer: NAME`` in a config -> a :class:`~lesionkit.engine.trainer.Trainer` subclass.

This is where a trainer name is resolved, for the config (:func:`load_train_config` reads a
recipe into the config class of the trainer it names) and for the run (:func:`build_trainer`).
:mod:`lesionkit.engine.config` knows no trainer.

The shipped recipes are listed in :data:`TRAINER_MODULES` as ``"module:Class"``; a module is
imported on first use (so ``import lesionkit.engine`` stays light) and its class needs no
decorator. A recipe of your own registers with ``@register_trainer(NAME)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from lesionkit.engine.config import TrainConfig, read_yaml_mapping

TRAINER_MODULES: dict[str, str] = {
    "segmentation": "lesionkit.engine.trainer:Trainer",
    "segmae": "lesionkit.engine.trainers.segmae:SegMAETrainer",
    "cmssm": "lesionkit.engine.trainers.cmssm:CMSSMTrainer",
    "mae": "lesionkit.engine.trainers.mae:MAETrainer",
    "grcsf": "lesionkit.engine.trainers.grcsf:GRCSFTrainer",
    "amlp": "lesionkit.engine.trainers.amlp:AMLPTrainer",
}

TRAINERS: dict[str, type] = {}  # name -> Trainer subclass, filled on registration or first use


def register_trainer(name: str) -> Callable[[type], type]:
    """Class decorator: make a Trainer subclass available as ``trainer: name``."""
    def wrap(cls: type) -> type:
        if name in TRAINERS and TRAINERS[name] is not cls:
            raise ValueError(f"trainer {name!r} is registered twice ({TRAINERS[name].__qualname__} and {cls.__qualname__})")
        TRAINERS[name] = cls
        return cls

    return wrap


def trainer_names() -> list[str]:
    return sorted(set(TRAINERS) | set(TRAINER_MODULES))


def get_trainer_class(name: str) -> type:
    """The trainer registered as ``name``, importing its module from :data:`TRAINER_MODULES` on first use."""
    if name not in TRAINERS and name in TRAINER_MODULES:
        module, _, attr = TRAINER_MODULES[name].partition(":")
        cls = getattr(importlib.import_module(module), attr, None)
        if cls is None:
            raise ValueError(f"module {module!r} does not define {attr!r}, the class of trainer {name!r}")
        TRAINERS[name] = cls
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; registered trainers: {trainer_names()}")
    return TRAINERS[name]


def load_train_config(source: str | Path | dict) -> TrainConfig:
    """A config (YAML file, recipe name or dict) as the dataclass of the trainer its ``trainer:`` key names.

    A string that names no file but a recipe shipped in ``lesionkit/configs/`` (``"segmae_isic2018"``)
    loads that recipe; :func:`lesionkit.configs.list_recipes` lists them.
    """
    if isinstance(source, dict):
        data, where = source, None
    else:
        from lesionkit.configs import resolve_recipe

        where = resolve_recipe(source)
        data = read_yaml_mapping(where)
    name = data.get("trainer", TrainConfig.trainer)
    try:
        return get_trainer_class(name).config_class.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


def build_trainer(config: TrainConfig, **kwargs):
    """The trainer class named by ``config.trainer``, constructed on ``config``."""
    return get_trainer_class(config.trainer)(config, **kwargs)


__all__ = ["TRAINERS", "TRAINER_MODULES", "build_trainer", "get_trainer_class", "load_train_config", "register_trainer",
           "trainer_names"]
