"""Steering panel: generate with and without an edit, one text above the other, with the steered positions marked.

The panel never sees a model; it calls `generate(prompt, feature, strength)`, which must return
an object (NamedTuple, dataclass or dict) with

    prompt_tokens: list[str]     the prompt as the model tokenised it
    tokens: list[str]            the generated tokens
    steered: list[bool]          one per position of prompt + generation: whether the edit applied there
    probs: [V] array-like        next-token probabilities at the last prompt position (with the edit)

`generate(prompt, None, 0.0)` is the unedited baseline (cached per prompt). Any edit fits: add
strength * an SAE latent's decoder row, force a codebook code, add a plain vector.
`nbfeatures.steering.steering_fn(model, site, W_dec)` builds such a callable from a model; the panel reads two
optional attributes of it: `act_norm` (the site's typical activation norm: the strength slider spans twice it)
and `promoted` (feature -> the tokens its direction promotes: the label of a feature without a name).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go

from ..plots import describe_steered, generation_html, looks_word_level, next_token_bars, show_token
from ..plots._checks import as_float, as_int
from ..plots.tokens import BOLD_STYLE, STEERED_STYLE
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


def _unnamed(name: Any) -> bool:
    """No name: None, NaN, blank, or what str() made of a missing value in a table column ("None", "nan")."""
    if isinstance(name, float) and name != name:
        return True
    return name is None or str(name).strip() in ("", "None", "nan", "NaN", "<NA>")


def _nice_up(x: float) -> float:
    """x rounded up to two significant digits (a slider end that reads well)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / step - 1e-9) * step, 12)


def _probs(result: Any) -> np.ndarray:
    p = _field(result, "probs")
    p = p.detach().cpu().numpy() if hasattr(p, "detach") else np.asarray(p)
    return p.astype(np.float64).reshape(-1)


class SteeringPanel(ipw.VBox):
    """Prompt, feature picker (index, or search over names), strength slider (one call per release), Generate button.

    Outputs: baseline_html above steered_html (in `texts`, each full width and wrapping), where (which positions
    are steered), next_token_fig (next-token probabilities before / after), status.

    names: feature names (a list, a mapping id -> name, or the number of features); a feature without a name
    (None, "") is labelled by the tokens it promotes: `#2 · ↑ sea, boat, wave`.
    promoted: feature -> its top promoted tokens (a mapping or a callable); default `generate.promoted`.
    max_strength: the slider spans [-max_strength, max_strength]; None: twice `generate.act_norm` where the
    callable reports it (steering_fn does), else 20.
    """

    def __init__(self, generate: Callable[[str, int | None, float], Any], vocab: Sequence[str],
                 names: Sequence[str | None] | Mapping[int, str | None] | int, *, prompt: str = "",
                 feature: int | None = None, strength: float = 4.0, max_strength: float | None = None,
                 promoted: Mapping[int, Sequence[str]] | Callable[[int], Sequence[str]] | None = None,
                 k: int = 10, max_rows: int = 100):
        if not callable(generate):
            raise TypeError(f"generate must be a callable (prompt, feature, strength) -> result, got {type(generate).__name__}")
        k, max_rows = as_int("k", k, 1), as_int("max_rows", max_rows, 1)
        strength = as_float("strength", strength)
        self.act_norm: float | None = None  # the site's typical activation norm, as the callable reported it
        if max_strength is None:
            norm = getattr(generate, "act_norm", None)
            if isinstance(norm, (int, float)) and not isinstance(norm, bool) and math.isfinite(norm) and norm > 0:
                self.act_norm = float(norm)
            max_strength = max(_nice_up(2 * self.act_norm) if self.act_norm else 20.0, abs(strength))
        if not as_float("max_strength", max_strength) > 0 or not abs(strength) <= max_strength:
            raise ValueError(f"need max_strength > 0 and |strength| <= max_strength, got strength={strength}, max_strength={max_strength}")
        promoted = getattr(generate, "promoted", None) if promoted is None else promoted
        if promoted is not None and not (callable(promoted) or isinstance(promoted, Mapping)):
            raise TypeError(f"promoted must be a mapping or a callable feature id -> tokens, got {type(promoted).__name__}")
        self.generate_fn, self.vocab, self.k, self.max_rows, self.promoted = generate, list(vocab), k, max_rows, promoted
        self.word_level = looks_word_level(self.vocab)  # decided once, from the whole vocabulary
        if isinstance(names, int):
            names = {i: None for i in range(names)}
        names = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
        self.names: dict[int, str] = {i: "" if _unnamed(n) else str(n) for i, n in names.items()}
        if not self.names:
            raise ValueError("names must list at least one feature (or pass the number of features)")
        feature = min(self.names) if feature is None else feature
        if feature not in self.names:
            raise ValueError(f"feature {feature!r} is not among the {len(self.names)} named features "
                             f"(ids {min(self.names)}..{max(self.names)})")
        self._labels: dict[int, str] = {}
        self.prompt = ipw.Textarea(value=prompt, description="prompt", layout=ipw.Layout(width="100%"))
        self.search = ipw.Text(placeholder="search feature names or #id", description="search", continuous_update=True)
        self.results = ipw.Select(options=[], rows=6, layout=ipw.Layout(width="100%"))
        self.feature = ipw.BoundedIntText(value=feature, min=min(self.names), max=max(self.names), description="feature")
        step = 10.0 ** math.floor(math.log10(max_strength / 100))  # 100 to 1000 steps from 0 to the end: 0.1 for 20
        self.strength = ipw.FloatSlider(value=strength, min=-max_strength, max=max_strength, step=step,
                                        readout_format=f".{max(0, -math.floor(math.log10(step)))}f",
                                        description="strength", continuous_update=False)  # one model call per release
        self.generate_button = ipw.Button(description="Generate", button_style="primary", icon="play")
        self.where = ipw.HTML()
        self.status = ipw.HTML()
        # one above the other, each the full width: two long texts side by side overflowed into each other
        self.baseline_html = ipw.HTML(layout=ipw.Layout(width="100%", min_width="0"))
        self.steered_html = ipw.HTML(layout=ipw.Layout(width="100%", min_width="0"))
        self.texts = ipw.VBox([self.baseline_html, self.steered_html], layout=ipw.Layout(width="100%"))
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
            self.where, self.texts, self._next.view,
        ])

    def label(self, f: int) -> str:
        """Feature f as the list shows it: `#f name`, and the tokens it promotes (`#f · ↑ sea, boat`) where known."""
        if f not in self._labels:
            name = self.names.get(f, "")
            tokens = []
            if self.promoted is not None:
                got = self.promoted.get(f) if isinstance(self.promoted, Mapping) else self.promoted(f)
                tokens = [t.strip() or show_token(t) for t in map(str, got or [])]
            self._labels[f] = f"#{f}" + (f" {name}" if name else "") + (f" · ↑ {', '.join(tokens)}" if tokens else "")
        return self._labels[f]

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
        b_differs = [i >= len(s_tokens) or t != s_tokens[i] for i, t in enumerate(b_tokens)]
        self.baseline_html.value = generation_html(_field(base, "prompt_tokens"), b_tokens, None, "baseline", b_differs,
                                                   word_level=self.word_level)
        self.steered_html.value = generation_html(s_prompt, s_tokens, mask, f"steered: {self.label(f)} · strength {s:g}",
                                                  differs, word_level=self.word_level)
        self.where.value = (f"<b>steered:</b> {describe_steered(mask, len(s_prompt))} "
                            f"(<span style=\"{STEERED_STYLE}\">underlined</span>); "
                            f"<span style=\"{BOLD_STYLE}\">bold on green</span>: generated tokens where the two texts differ")
        self._next.update(next_token_bars(_probs(base), _probs(steered), self.vocab, self.k))
        return differs

    def _stale(self) -> None:
        if self.steered is not None:
            self.status.value = "<i>changed: press Generate (or move the strength)</i>"

    def _refilter(self) -> None:
        term = self.search.value.strip().lower()
        ids = [i for i, n in self.names.items() if not term or term in n.lower() or term.lstrip("#") == str(i)]
        options = [(self.label(i)[:80], i) for i in ids[: self.max_rows]]
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
