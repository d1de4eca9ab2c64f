"""Normalising size arguments."""

from __future__ import annotations


def as_hw(size, name: str = "image_size") -> tuple[int, int]:
    """int or (h, w) -> (h, w); raises ValueError naming `name` otherwise."""
    if isinstance(size, bool):
        raise ValueError(f"{name} should be an int or (h, w), got {size!r}")
    if isinstance(size, int):
        hw = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, int) and not isinstance(s, bool) for s in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{name} should be an int or (h, w), got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"{name} should be positive, got {size!r}")
    return hw
