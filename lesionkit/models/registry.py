"""timm-style model registry: ``@register_model``, ``create_model(name, **kwargs)``, ``list_models()``."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, TypeVar

from torch import nn

from lesionkit.layers.linear import convert_linears

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


_SMOKE_TESTS: dict[str, dict[str, Any]] = {}
_DEFAULT_SMOKE = {"kwargs": {}, "input_size": (3, 32, 32), "inputs": {}}


def register_model(fn: F | None = None, *, smoke_test: dict[str, Any] | None = None):
    """Register ``fn`` under its own name; ``fn(**kwargs)`` must return the model.

    ``smoke_test``: how the registry-driven test builds it cheaply, ``{"kwargs": {...},
    "input_size": (C, H, W), "inputs": {name: shape}}`` (default: no kwargs, 3x32x32, no
    inputs) - e.g. fewer layers for a paper-size transformer whose input size is fixed.
    ``inputs`` names the extra keyword inputs of ``forward`` and their shapes without the batch
    (e.g. GRCSF's ``{"residual_maps": (2, H, W)}``); the test passes random tensors for them.
    ``"task": "reconstruction"`` marks a model that reconstructs instead of segmenting (the MAEs
    of GRCSF's residual maps): the test checks its ``reconstruction`` instead of logits.
    """

    def add(fn: F) -> F:
        name = fn.__name__
        if name in _ENTRYPOINTS:
            raise ValueError(f"model {name!r} is registered twice ({_ENTRYPOINTS[name].__module__} and {fn.__module__})")
        _ENTRYPOINTS[name] = fn
        _SMOKE_TESTS[name] = {**_DEFAULT_SMOKE, **(smoke_test or {})}
        return fn

    return add(fn) if fn is not None else add


def smoke_test_config(name: str) -> dict[str, Any]:
    """``{"kwargs": ..., "input_size": (C, H, W), "inputs": {...}}`` for the registry smoke test of ``name``."""
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _SMOKE_TESTS[name]


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``."""
    names = sorted(_ENTRYPOINTS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def is_model(name: str) -> bool:
    return name in _ENTRYPOINTS


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override fields of its config dataclass.

    The returned module carries ``model_name`` and ``model_kwargs`` so that a checkpoint can
    rebuild it.
    """
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    model = convert_linears(_ENTRYPOINTS[name](**kwargs))  # float32 CPU products via oneDNN where faster
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model


C = TypeVar("C")


def build_config(config_cls: type[C], defaults: dict[str, Any], overrides: dict[str, Any], model: str) -> C:
    """``config_cls(**defaults)`` with ``overrides`` applied; an unknown field names the model and the valid fields."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model {model!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    values = {**defaults, **overrides}
    # YAML and the CLI give lists where the dataclasses hold tuples.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return config_cls(**values)
