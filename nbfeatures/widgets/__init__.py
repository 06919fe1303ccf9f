"""Notebook panels: thin ipywidgets containers over the figures in nbfeatures.plots.

A panel takes data or callables, never a model (this package never imports nnsight or
nbfeatures.sites); its controls and figures are public attributes, so tests and notebooks can
drive it from Python. Where go.FigureWidget cannot be built (no anywidget), figures are static.
"""

from .figure import FigureSlot, figure_widgets_available, replace_figure
from .fsm import FSMPanel
from .gallery import FeatureGallery
from .inversion import InversionPanel
from .live import LiveCurves
from .progress import CourseProgress
from .prompt import PromptView
from .steering import SteeringPanel

__all__ = ["LiveCurves", "FeatureGallery", "SteeringPanel", "FSMPanel", "InversionPanel", "PromptView", "FigureSlot", "figure_widgets_available", "replace_figure"]
__all__ += ["CourseProgress"]
