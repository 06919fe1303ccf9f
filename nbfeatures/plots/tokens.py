"""Token sequences as text a person reads: the one renderer behind every panel and card.

Tokenizers spell their pieces in several ways; `display_tokens` turns each piece into the text it stands for,
leading space included, so the pieces concatenate to the original text:

    GPT-2 byte-level BPE    "Ġthe" "Ċ" "âĢĻ"        ->  " the" "\\n" "’"     (bytes, decoded as UTF-8 across pieces)
    SentencePiece           "▁the" "<0x0A>"         ->  " the" "\\n"
    decoded pieces          " the" (tok.decode([i]))  ->  " the"             (as they are)
    word level / WordPiece  "the" "sea" "." "##s"    ->  " the" " sea" "." "s"  (a space between words; none
                                                                              before closing punctuation or ##)

`tokens_html` draws one span per token: a hairline at each token's right edge shows the boundaries,
special tokens (`<bos>`, `<|endoftext|>`, `[CLS]`) are dimmed, whitespace-only tokens show a faint glyph
(· space, ↵ newline, → tab), and the text wraps inside its column instead of running into a neighbour.
Pure functions returning strings (shown in an ipywidgets.HTML); every token is escaped.
"""

from __future__ import annotations

import codecs
import html
import math
import re
from functools import lru_cache
from typing import Sequence

# Wrap inside the column: pre-wrap keeps the tokens' own spaces and newlines, overflow-wrap: anywhere breaks a run
# with no spaces (and lets a flex parent shrink it: it lowers the min-content width), max-width keeps it in its box.
WRAP_STYLE = ("font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; line-height: 1.9; "
              "white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; max-width: 100%; min-width: 0; "
              "box-sizing: border-box; margin: 1px 0")
TOKEN_STYLE = "border-right: 1px solid rgba(128,128,128,0.35)"  # the hairline between tokens
SPECIAL_STYLE = "color: #9a9a9a; font-size: 0.85em"
GLYPH_STYLE = "opacity: 0.45"  # the faint · ↵ → standing for whitespace
STEERED_STYLE = "background: rgba(255,127,14,0.35); border-bottom: 2px solid #ff7f0e"
BOLD_STYLE = "font-weight:700; background: rgba(44,160,44,0.28)"  # differs from the other text: bold on green
CENTER_STYLE = "outline: 1.5px solid #d62728"

_SPECIAL = re.compile(r"<\|[^<>]{0,60}\|>|<(?!0x[0-9A-Fa-f]{2}>)/?[A-Za-z_][^<>\s]{0,40}>|\[[A-Z][A-Z_]{1,15}\]")
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CLOSING = re.compile(r"[.,!?;:%)\]}»”…]+|'(?:s|t|d|m|re|ve|ll)|n't", re.IGNORECASE)
_OPENING = ("(", "[", "{", "«", "“", "\n")
_GLYPHS = {"\t": "→", "\r": "␍"}  # a newline shows as ↵, any other whitespace as ·


def plotly_text(s: object) -> str:
    """Text safe to hand plotly as a title, tick label, cell text or hover text: plotly reads a few HTML tags in
    text (<b>, <i>, <s>, <br>, <sup>, ...), so a token `<s>` would strike through what follows and vanish itself.
    `&`, `<` and `>` become entities, which plotly shows as the characters."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each of the 256 bytes -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def is_special(piece: str) -> bool:
    """Whether a piece looks like a special token: <bos>, </s>, <|endoftext|>, [CLS] (a byte token <0x0A> is not)."""
    return bool(_SPECIAL.fullmatch(piece))


def _spelling(pieces: Sequence[str]) -> str:
    """'sentencepiece', 'bytelevel' or 'text' (decoded, or word level): how the non-special pieces are spelled."""
    if any("▁" in p for p in pieces):
        return "sentencepiece"
    table = _byte_decoder()
    if pieces and all(c in table for p in pieces for c in p):  # no real space or newline anywhere
        if any("\u0100" <= c <= "\u0143" for p in pieces for c in p):  # Ġ Ċ ĉ and the other remapped bytes
            return "bytelevel"
        if any(c >= "\u0080" for p in pieces for c in p):  # only Latin-1 letters: mojibake of UTF-8 ("Ã©"), or real text
            try:
                bytes(table[c] for p in pieces for c in p).decode("utf-8")
                return "bytelevel"
            except UnicodeDecodeError:
                return "text"
    return "text"


def looks_word_level(tokens: Sequence[str]) -> bool:
    """True when no token carries a leading space or a Ġ / ▁ marker: whole words that need spaces put between them.

    Pass a whole vocabulary (e.g. `token_strings(model)`) for a sure answer; a short sequence can mislead.
    """
    pieces = [str(t) for t in tokens if not is_special(str(t))]
    if _spelling(pieces) != "text":
        return False
    return not any(p[:1].isspace() for p in pieces)


def display_tokens(tokens: Sequence[str], word_level: bool | None = None) -> list[str]:
    """The text each token stands for, with its leading space: `"".join(display_tokens(t))` reads as the text.

    tokens: raw pieces (`convert_ids_to_tokens`: "Ġthe", "▁the", "<0x0A>") or decoded ones (`decode([i])`: " the").
    word_level: put a space between tokens (not before closing punctuation or a "##" continuation); None decides
    with `looks_word_level(tokens)`. Special tokens stay as they are. A piece holding only the first bytes of a
    character shows as "" and the piece that completes it shows the character.
    """
    raw = [str(t) for t in tokens]
    special = [is_special(p) for p in raw]
    spelling = _spelling([p for p, s in zip(raw, special) if not s])
    if word_level is None:
        word_level = looks_word_level(raw)
    table, out = _byte_decoder(), []
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for p, s in zip(raw, special):
        data = None
        if not s and (m := _BYTE.fullmatch(p)):
            data = bytes([int(m.group(1), 16)])
        elif not s and spelling == "bytelevel":
            data = bytes(table[c] for c in p)
        if data is None:
            if tail := utf8.decode(b"", final=True):  # an unfinished character before a plain piece
                out[-1] += tail
            utf8.reset()
            out.append(p.replace("▁", " ") if spelling == "sentencepiece" and not s else p)
        else:
            out.append(utf8.decode(data))
    if out and (tail := utf8.decode(b"", final=True)):
        out[-1] += tail
    if word_level:
        for i in range(len(out)):
            d = out[i]
            if d.startswith("##") and len(d) > 2 and not special[i]:
                out[i] = d[2:]  # WordPiece continuation: glued to the word before
                continue
            prev = out[i - 1] if i else ""
            if i and d and prev and not d[0].isspace() and not prev[-1].isspace() and not prev.endswith(_OPENING) \
                    and not _CLOSING.fullmatch(d):
                out[i] = " " + d
    return out


def _glyph(text: str) -> str:
    return f"<span class=\"nbf-glyph\" style=\"{GLYPH_STYLE}\">{html.escape(text)}</span>"


def _text(d: str) -> str:
    """A token's text as HTML, escaped; a faint ↵ before each newline, and a whitespace-only token drawn in faint
    glyphs (· space, → tab), so it shows. Newlines stay real newlines (outside the glyphs): the text breaks there."""
    d = d.replace("\r\n", "\n")
    if d.isspace():
        lines = ["".join(_GLYPHS.get(c, "·") for c in line) for line in d.split("\n")]
        return "\n".join(_glyph(g + "↵") if i < len(lines) - 1 else _glyph(g) if g else ""
                         for i, g in enumerate(lines))
    return (_glyph("↵") + "\n").join(html.escape(line, quote=True) for line in d.split("\n"))


def _per_token(name: str, values, n: int) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per token ({n}), got {len(values)}")
    return values


def tokens_html(tokens: Sequence[str], *, shade: Sequence[float] | None = None, titles: Sequence[str] | None = None,
                marks: Sequence[bool | str | None] | None = None, bold: Sequence[bool] | None = None,
                center: int | None = None, word_level: bool | None = None) -> str:
    """One <div> of token spans that reads as text and wraps in its column (see the module docstring).

    tokens: raw or decoded pieces (see `display_tokens`); word_level: as there (None: detect from `tokens`).
    shade: per token, a fraction in [0, 1]: the orange background's opacity (an activation / the max; NaN: none).
    titles: per token, hover text (the raw piece is added after it).
    marks: per token, True for the steered mark (orange underline, `STEERED_STYLE`), or a CSS string to add.
    bold: per token, True to make it bold on a green background (e.g. differs from the baseline).
    center: the index of one token to outline in red (the token a context was sampled at).
    Every span has class nbf-tok; special tokens also nbf-special (dimmed), whitespace-only ones nbf-ws.
    """
    raw = [str(t) for t in tokens]
    n = len(raw)
    shade, titles = _per_token("shade", shade, n), _per_token("titles", titles, n)
    marks, bold = _per_token("marks", marks, n), _per_token("bold", bold, n)
    if center is not None and (isinstance(center, bool) or not isinstance(center, int) and not hasattr(center, "__index__")):
        raise ValueError(f"center must be None or a token index (int), got {center!r}")
    shown = display_tokens(raw, word_level)
    spans = []
    for i, (p, d) in enumerate(zip(raw, shown)):
        classes, style = ["nbf-tok"], [TOKEN_STYLE]
        if is_special(p):
            classes.append("nbf-special")
            style.append(SPECIAL_STYLE)
        elif d and d.isspace():
            classes.append("nbf-ws")
        if shade[i] is not None:
            a = float(shade[i])
            style.append(f"background: rgba(255,127,14,{min(max(a, 0.0), 1.0) if math.isfinite(a) else 0.0:.2f})")
        if marks[i] is True:
            style.append(STEERED_STYLE)
        elif isinstance(marks[i], str) and marks[i]:
            style.append(marks[i])
        if bold[i]:
            style.append(BOLD_STYLE)
        if center is not None and i == int(center):
            style.append(CENTER_STYLE)
        title = f"{titles[i]} · {p!r}" if titles[i] is not None else repr(p)
        spans.append(f"<span class=\"{' '.join(classes)}\" style=\"{'; '.join(style)}\" "
                     f"title=\"{html.escape(title, quote=True)}\">{_text(d)}</span>")
    return f"<div class=\"nbf-tokens\" style=\"{WRAP_STYLE}\">{''.join(spans)}</div>"
