"""Figures as pure functions: arrays in, a plotly go.Figure (or an HTML string) out; numpy + plotly only."""

from .bars import activation_histogram, feature_overview, next_token_bars, output_tokens_bar, show_token, unique_labels
from .curves import Curve, curves, curves_title, default_panels, ema, training_curves
from .fsm import next_state_bars, state_codes_table
from .html import card_html, contexts_html, describe_steered, generation_html, shaded_tokens
from .inversion import inversion_samples, query_html, shared_html, shared_tokens

__all__ = [
    "training_curves", "curves", "curves_title", "Curve", "ema", "default_panels",
    "activation_histogram", "output_tokens_bar", "next_token_bars", "feature_overview", "show_token", "unique_labels",
    "shaded_tokens", "contexts_html", "card_html", "generation_html", "describe_steered",
    "next_state_bars", "state_codes_table", "inversion_samples", "query_html", "shared_tokens", "shared_html",
]
