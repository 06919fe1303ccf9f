"""Notebook panels: thin ipywidgets containers over the figures in nbfeatures.plots.

A panel takes data or callables, never a model (this package never imports nnsight or
nbfeatures.sites); its controls and figures are public attributes, so tests and notebooks can
drive it from Python. Where go.FigureWidget cannot be built (no anywidget), figures are static.
"""

from .figure import FigureSlot, figure_widgets_available, replace_figure
from .gallery import FeatureGallery
from .live import LiveCurves
from .steering import SteeringPanel

__all__ = ["LiveCurves", "FeatureGallery", "SteeringPanel", "FigureSlot", "figure_widgets_available", "replace_figure"]
