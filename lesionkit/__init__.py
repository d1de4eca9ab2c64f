"""lesionkit: lesion segmentation with custom kernels on its hot paths."""

__version__ = "0.2.0"

# Resolved on first use so that `import lesionkit` stays light (no model code imported).
_LAZY = {"create_model": "lesionkit.models", "list_models": "lesionkit.models"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lesionkit' has no attribute {name!r}")
