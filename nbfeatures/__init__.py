"""nbfeatures: Jupyter-first mechanistic interpretability on nnsight."""

from ._versions import __version__

__all__ = ["__version__"]
