"""Figures as pure functions: arrays in, a plotly go.Figure (or an HTML string) out; numpy + plotly only."""

from .bars import activation_histogram, feature_overview, next_token_bars, output_tokens_bar, show_token, unique_labels
from .curves import Curve, curves, curves_title, default_panels, ema, training_curves
from .fsm import next_state_bars, state_codes_table
from .html import card_html, contexts_html, describe_steered, generation_html, shaded_tokens
from .inversion import inversion_samples, query_html, shared_html, shared_tokens
from .prompt import prompt_tokens_html, token_features_table, token_titles
from .tokens import display_tokens, is_special, looks_word_level, tokens_html

__all__ = [
    "training_curves", "curves", "curves_title", "Curve", "ema", "default_panels",
    "activation_histogram", "output_tokens_bar", "next_token_bars", "feature_overview", "show_token", "unique_labels",
    "tokens_html", "display_tokens", "looks_word_level", "is_special",
    "shaded_tokens", "contexts_html", "card_html", "generation_html", "describe_steered",
    "next_state_bars", "state_codes_table", "inversion_samples", "query_html", "shared_tokens", "shared_html",
    "prompt_tokens_html", "token_features_table", "token_titles",
]
