"""lesionkit: lesion segmentation with custom kernels on its hot paths."""

__version__ = "0.1.0"
