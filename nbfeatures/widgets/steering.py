"""Steering panel: generate with and without an edit, side by side, with the steered positions marked.

The panel never sees a model; it calls `generate(prompt, feature, strength)`, which must return
an object (NamedTuple, dataclass or dict) with

    prompt_tokens: list[str]     the prompt as the model tokenised it
    tokens: list[str]            the generated tokens
    steered: list[bool]          one per position of prompt + generation: whether the edit applied there
    probs: [V] array-like        next-token probabilities at the last prompt position (with the edit)

`generate(prompt, None, 0.0)` is the unedited baseline (cached per prompt). Any edit fits: add
strength * an SAE latent's decoder row, force a codebook code, add a plain vector.
`nbfeatures.steering.steering_fn(model, site, W_dec)` builds such a callable from a model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go

from ..plots import describe_steered, generation_html, next_token_bars
from ..plots._checks import as_float, as_int
from .figure import FigureSlot, reported


def _field(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        if name not in result:
            raise ValueError(f"the generate callable returned a mapping without {name!r}; it needs prompt_tokens, tokens, steered, probs")
        return result[name]
    if not hasattr(result, name):
        raise ValueError(f"the generate callable returned a {type(result).__name__} without .{name}; "
                         "it needs prompt_tokens, tokens, steered, probs")
    return getattr(result, name)


def _probs(result: Any) -> np.ndarray:
    p = _field(result, "probs")
    p = p.detach().cpu().numpy() if hasattr(p, "detach") else np.asarray(p)
    return p.astype(np.float64).reshape(-1)


class SteeringPanel(ipw.VBox):
    """Prompt, feature picker (index, or search over names), strength slider (one call per release), Generate button.

    Outputs: baseline_html and steered_html side by side, where (which positions are steered),
    next_token_fig (next-token probabilities before / after), status.
    """

    def __init__(self, generate: Callable[[str, int | None, float], Any], vocab: Sequence[str],
                 names: Sequence[str] | Mapping[int, str] | int, *, prompt: str = "", feature: int | None = None,
                 strength: float = 4.0, max_strength: float = 20.0, k: int = 10, max_rows: int = 100):
        if not callable(generate):
            raise TypeError(f"generate must be a callable (prompt, feature, strength) -> result, got {type(generate).__name__}")
        k, max_rows = as_int("k", k, 1), as_int("max_rows", max_rows, 1)
        if not as_float("max_strength", max_strength) > 0 or not abs(as_float("strength", strength)) <= max_strength:
            raise ValueError(f"need max_strength > 0 and |strength| <= max_strength, got strength={strength}, max_strength={max_strength}")
        self.generate_fn, self.vocab, self.k, self.max_rows = generate, list(vocab), k, max_rows
        if isinstance(names, int):
            names = {i: "" for i in range(names)}
        self.names: dict[int, str] = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
        if not self.names:
            raise ValueError("names must list at least one feature (or pass the number of features)")
        feature = min(self.names) if feature is None else feature
        if feature not in self.names:
            raise ValueError(f"feature {feature!r} is not among the {len(self.names)} named features "
                             f"(ids {min(self.names)}..{max(self.names)})")
        self.prompt = ipw.Textarea(value=prompt, description="prompt", layout=ipw.Layout(width="100%"))
        self.search = ipw.Text(placeholder="search feature names or #id", description="search", continuous_update=True)
        self.results = ipw.Select(options=[], rows=6, layout=ipw.Layout(width="100%"))
        self.feature = ipw.BoundedIntText(value=feature, min=min(self.names), max=max(self.names), description="feature")
        self.strength = ipw.FloatSlider(value=strength, min=-max_strength, max=max_strength, step=0.1,
                                        description="strength", continuous_update=False)  # one model call per release
        self.generate_button = ipw.Button(description="Generate", button_style="primary", icon="play")
        self.where = ipw.HTML()
        self.status = ipw.HTML()
        self.baseline_html = ipw.HTML(layout=ipw.Layout(width="50%"))
        self.steered_html = ipw.HTML(layout=ipw.Layout(width="50%"))
        self._next = FigureSlot(next_token_bars(np.zeros(len(self.vocab)), np.zeros(len(self.vocab)), self.vocab, k))
        self._baseline: dict[str, Any] = {}
        self.baseline: Any = None  # the last results, as the callable returned them
        self.steered: Any = None
        self._syncing = False

        self.search.observe(lambda _: self._refilter(), names="value")
        self.results.observe(self._picked, names="value")
        self.feature.observe(lambda _: self._stale(), names="value")
        self.prompt.observe(lambda _: self._stale(), names="value")
        self.strength.observe(lambda _: self.run(), names="value")
        self.generate_button.on_click(lambda _: self.run())
        self._refilter()
        super().__init__([
            self.prompt,
            ipw.HBox([ipw.VBox([self.search, self.results], layout=ipw.Layout(width="45%")),
                      ipw.VBox([self.feature, self.strength, ipw.HBox([self.generate_button, self.status])])]),
            self.where, ipw.HBox([self.baseline_html, self.steered_html]), self._next.view,
        ])

    @property
    def next_token_fig(self) -> go.Figure:
        return self._next.figure

    def run(self) -> None:
        """Generate the baseline (cached per prompt) and the steered text, and draw both."""
        prompt, f, s = self.prompt.value, int(self.feature.value), float(self.strength.value)
        self.status.value = "<i>generating…</i>"
        with reported(self.status):
            if prompt not in self._baseline:
                self._baseline = {prompt: self.generate_fn(prompt, None, 0.0)}
            self.baseline, self.steered = self._baseline[prompt], self.generate_fn(prompt, f, s)
            differs = self._draw(f, s)
        self.status.value = f"{sum(differs)} of {len(differs)} generated tokens differ"

    def _draw(self, f: int, s: float) -> list[bool]:
        base, steered = self.baseline, self.steered
        b_tokens, s_tokens = list(_field(base, "tokens")), list(_field(steered, "tokens"))
        s_prompt, mask = list(_field(steered, "prompt_tokens")), list(_field(steered, "steered"))
        if len(mask) != len(s_prompt) + len(s_tokens):
            raise ValueError(f"steered has {len(mask)} entries; it needs one per prompt and generated token "
                             f"({len(s_prompt)} + {len(s_tokens)})")
        differs = [i >= len(b_tokens) or t != b_tokens[i] for i, t in enumerate(s_tokens)]
        name = self.names.get(f, "")
        self.baseline_html.value = generation_html(_field(base, "prompt_tokens"), b_tokens, None, "baseline")
        self.steered_html.value = generation_html(s_prompt, s_tokens, mask, f"feature {f}{' · ' + name if name else ''} "
                                                  f"· strength {s:g}", differs)
        self.where.value = (f"<b>steered:</b> {describe_steered(mask, len(s_prompt))} "
                            f"<span style='background: rgba(255,127,14,0.35)'>(marked)</span>; "
                            f"<b>bold</b>: generated tokens that differ from the baseline")
        self._next.update(next_token_bars(_probs(base), _probs(steered), self.vocab, self.k))
        return differs

    def _stale(self) -> None:
        if self.steered is not None:
            self.status.value = "<i>changed: press Generate (or move the strength)</i>"

    def _refilter(self) -> None:
        term = self.search.value.strip().lower()
        ids = [i for i, n in self.names.items() if not term or term in n.lower() or term.lstrip("#") == str(i)]
        options = [(f"#{i} {self.names[i]}"[:80], i) for i in ids[: self.max_rows]]
        self._syncing = True
        try:
            self.results.options = options
            self.results.value = self.feature.value if self.feature.value in ids[: self.max_rows] else None
        finally:
            self._syncing = False
        if term and ids and self.feature.value not in ids:
            self.feature.value = ids[0]

    def _picked(self, change: dict) -> None:
        if not self._syncing and change["new"] is not None:
            self.feature.value = change["new"]
