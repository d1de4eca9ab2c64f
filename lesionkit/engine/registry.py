"""The trainer registry: ``trainer: NAME`` in a config -> a :class:`~lesionkit.engine.trainer.Trainer` subclass.

Each recipe has an explicit entry in :data:`TRAINER_MODULES` naming the module that defines it;
that module is imported on first use (so ``import lesionkit.engine`` stays light) and registers
its class with ``@register_trainer(NAME)``. A new recipe adds one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lesionkit.engine.trainer import Trainer

TRAINER_MODULES: dict[str, str] = {
    "segmentation": "lesionkit.engine.trainer",
    "segmae": "lesionkit.engine.segmae_trainer",
    "cmssm": "lesionkit.engine.cmssm_trainer",
    "mae": "lesionkit.engine.mae_trainer",
    "grcsf": "lesionkit.engine.grcsf_trainer",
    "amlp": "lesionkit.engine.amlp_trainer",
}

TRAINERS: dict[str, type[Trainer]] = {}


def register_trainer(name: str) -> Callable[[type[Trainer]], type[Trainer]]:
    """Class decorator: make a Trainer subclass available as ``trainer: name``."""
    def wrap(cls: type[Trainer]) -> type[Trainer]:
        if name in TRAINERS and TRAINERS[name] is not cls:
            raise ValueError(f"trainer {name!r} is registered twice ({TRAINERS[name].__qualname__} and {cls.__qualname__})")
        TRAINERS[name] = cls
        return cls

    return wrap


def trainer_names() -> list[str]:
    return sorted(set(TRAINERS) | set(TRAINER_MODULES))


def get_trainer_class(name: str) -> type[Trainer]:
    """The trainer registered as ``name``, importing its module from :data:`TRAINER_MODULES` on first use."""
    if name not in TRAINERS and name in TRAINER_MODULES:
        importlib.import_module(TRAINER_MODULES[name])
        if name not in TRAINERS:
            raise ValueError(f"module {TRAINER_MODULES[name]!r} does not register trainer {name!r}")
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; registered trainers: {trainer_names()}")
    return TRAINERS[name]


__all__ = ["TRAINERS", "TRAINER_MODULES", "get_trainer_class", "register_trainer", "trainer_names"]
