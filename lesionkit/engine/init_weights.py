"""Initialise a model from another checkpoint's weights (``init_from``, ``init_parts``).

Fine-tuning after pre-training (AMLP: ``amlp_unet_tiny`` -> ``unet_tiny``) loads the tensors of
the chosen parts whose names match. A model names its parts by state-dict prefixes in a class
attribute ``init_parts`` (``UNet``: encoder ``stem.`` / ``down.``, decoder ``up.``, head
``head.``); models without it accept ``all`` only. Loading reports what was loaded, what the
parts wanted but the checkpoint lacks (missing) and what the checkpoint held but was not used
(unused); it fails when nothing matches or a matching name has another shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PART_CHOICES = ("encoder", "encoder+decoder", "all")


@dataclass
class InitReport:
    path: str
    source_model: str
    parts: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # wanted by the parts, absent from the checkpoint
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not loaded

    def summary(self) -> str:
        def names(keys: list[str]) -> str:
            shown = ", ".join(keys[:6])
            return f"{len(keys)}" + (f" ({shown}{', ...' if len(keys) > 6 else ''})" if keys else "")

        return (f"init_from {self.path} (model {self.source_model}, parts {self.parts}): loaded {len(self.loaded)} "
                f"tensors; missing {names(self.missing)}; unused {names(self.unused)}")


def part_prefixes(model: nn.Module, parts: str) -> tuple[str, ...] | None:
    """State-dict prefixes of ``parts`` for ``model``; None means every tensor (``all``)."""
    if parts not in PART_CHOICES:
        raise ValueError(f"init_parts should be one of {list(PART_CHOICES)}, got {parts!r}")
    if parts == "all":
        return None
    declared = getattr(model, "init_parts", None)
    if not declared:
        raise ValueError(f"init_parts {parts!r}: model {type(model).__name__} does not name its encoder / decoder "
                         "(no init_parts attribute); use init_parts: all")
    names = parts.split("+")
    return tuple(prefix for name in names for prefix in declared[name])


def load_init_weights(model: nn.Module, path: str | Path, parts: str = "encoder") -> InitReport:
    """Copy the tensors of ``parts`` from the checkpoint at ``path`` into ``model`` (in place)."""
    from lesionkit.engine.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: checkpoint {str(path)!r} does not exist")
    state = load_checkpoint(path)
    source = state["model"]
    prefixes = part_prefixes(model, parts)
    target = model.state_dict()
    wanted = [k for k in target if prefixes is None or k.startswith(prefixes)]
    report = InitReport(str(path), str(state.get("model_name")), parts)
    mismatched = []
    for key in wanted:
        if key not in source:
            report.missing.append(key)
        elif source[key].shape != target[key].shape:
            mismatched.append(f"{key}: checkpoint {tuple(source[key].shape)}, model {tuple(target[key].shape)}")
        else:
            report.loaded.append(key)
    target_name = getattr(model, "model_name", type(model).__name__)
    if mismatched:
        shown = "; ".join(mismatched[:5]) + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 5 else "")
        raise ValueError(f"init_from {str(path)!r} (model {report.source_model}) does not fit {target_name}: shapes "
                         f"differ for {shown}")
    if not report.loaded:
        raise ValueError(f"init_from {str(path)!r} (model {report.source_model}): none of its tensors matches the "
                         f"{parts} of {target_name} ({len(wanted)} tensors wanted, e.g. {wanted[:3]})")
    loaded = set(report.loaded)
    report.unused = [k for k in source if k not in loaded]
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(source[key])
    return report


__all__ = ["InitReport", "PART_CHOICES", "load_init_weights", "part_prefixes"]
