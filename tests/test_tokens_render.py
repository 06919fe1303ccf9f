"""The one token renderer: what it draws reads back as the text, one span per token, specials dimmed, whitespace shown.

The oracle is the tokenizer itself: the text it was given, and its own `decode`. The rendered HTML is read back with
the standard library's html.parser, the way a browser would lay out the text (faint glyphs read as the whitespace
they stand for).
"""

from html.parser import HTMLParser

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from nbfeatures.data.stories import story_tokenizer, vocabulary
from nbfeatures.plots import display_tokens, is_special, looks_word_level, tokens_html
from nbfeatures.plots.tokens import BOLD_STYLE, SPECIAL_STYLE, STEERED_STYLE
from nbfeatures.sites import decode_each

GLYPHS = {"·": " ", "→": "\t", "↵": "", "␍": "\r"}  # what a faint glyph stands for (a newline follows ↵ as itself)


class Spans(HTMLParser):
    """Each token span (class nbf-tok) as {classes, style, title, text}; `text` is the whole read-back text."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.spans, self.stack, self.text, self.containers = [], [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "div" and "nbf-tokens" in classes:
            self.containers.append(attrs.get("style", ""))
        if "nbf-tok" in classes:
            self.spans.append({"classes": classes, "style": attrs.get("style", ""), "title": attrs.get("title"), "text": ""})
        self.stack.append((tag, "nbf-tok" in classes, "nbf-glyph" in classes))

    def handle_endtag(self, tag):
        self.stack.pop()

    def handle_data(self, data):
        glyph = any(g for _, _, g in self.stack)
        if glyph:
            data = "".join(GLYPHS.get(c, c) for c in data)
        self.text.append(data)
        if any(t for _, t, _ in self.stack):
            self.spans[-1]["text"] += data
            self.spans[-1].setdefault("shown", "")
            self.spans[-1]["shown"] += data if not glyph else "G"  # G: something visible stands there

    def read(self, skip_special: bool = True) -> str:
        return "".join(s["text"] for s in self.spans if not (skip_special and "nbf-special" in s["classes"]))


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-style byte-level BPE trained here on a few sentences (no download), as a transformers tokenizer."""
    texts = ["Mia was a little girl who loved the sea.", "The boat’s sail was red, and the café was open.",
             "Waves\n\nrolled  in\tslowly 😀 today."]
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts * 4, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


# ----------------------------------------------------------------------------- word level: the shipped story tokenizer


def test_story_tokenizer_reads_as_words_with_spaces():
    tok = story_tokenizer()
    sentence = "Mia was a little girl who loved the sea."
    ids = tok(sentence)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "<|endoftext|>"  # BOS prepended
    for pieces in (tok.convert_ids_to_tokens(ids), [tok.decode([i]) for i in ids]):  # raw and decoded alike here
        assert looks_word_level(pieces)
        spans = Spans(tokens_html(pieces))
        assert len(spans.spans) == len(pieces)  # one span per token
        assert [s["text"].strip() for s in spans.spans] == pieces
        assert spans.read() == " " + sentence  # a space after the dimmed BOS, none before the full stop
        assert "nbf-special" in spans.spans[0]["classes"] and SPECIAL_STYLE in spans.spans[0]["style"]
        assert not any("nbf-special" in s["classes"] for s in spans.spans[1:])
    assert "Miawasa" not in Spans(tokens_html(tok.convert_ids_to_tokens(ids))).read()


def test_the_whole_story_vocabulary_is_word_level_and_commas_attach():
    words = list(vocabulary()[0])
    assert looks_word_level(words)
    assert display_tokens(["Once", "upon", "a", "time", ",", "there", "was", "Ben", "."]) == \
        ["Once", " upon", " a", " time", ",", " there", " was", " Ben", "."]


def test_word_level_can_be_forced_either_way():
    assert "".join(display_tokens(["a", "b"], word_level=False)) == "ab"
    assert "".join(display_tokens([" a", "b"], word_level=True)) == " a b"
    assert display_tokens(["un", "##believ", "##able", "!"]) == ["un", "believ", "able", "!"]  # WordPiece


# ----------------------------------------------------------------------------- byte-level BPE, raw and decoded


TEXTS = ["Mia was a little girl who loved the sea.", "The boat’s sail was red, and the café was open.",
         "Waves\n\nrolled  in\tslowly 😀 today."]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_raw_pieces_read_back_as_the_text(bpe, text):
    ids = bpe(text)["input_ids"]
    pieces = bpe.convert_ids_to_tokens(ids)
    assert bpe.decode(ids) == text
    assert not looks_word_level(pieces)
    assert "".join(display_tokens(pieces)) == text
    spans = Spans(tokens_html(pieces))
    assert len(spans.spans) == len(pieces)
    assert spans.read() == text
    assert [s["title"] for s in spans.spans] == [repr(p) for p in pieces]  # hover names the raw piece


def test_byte_level_pieces_of_one_character_show_it_once(bpe):
    shown = display_tokens(["The", "Ġboat", "â", "Ģ", "Ļ", "s"])
    assert shown == ["The", " boat", "", "", "’", "s"]  # the piece that completes the character shows it
    assert display_tokens(["caf", "Ã", "©"]) == ["caf", "", "é"]
    assert display_tokens(["Ã©"]) == ["é"]  # mojibake of UTF-8 without any Ġ: still byte level
    assert display_tokens(["café"]) == ["café"]  # real Latin-1 text is left alone


def test_decoded_pieces_read_back_as_the_text(bpe):
    text = TEXTS[0]
    ids = bpe(text)["input_ids"]
    pieces = [bpe.decode([i]) for i in ids]  # what token_strings gives the panels
    assert any(p.startswith(" ") for p in pieces) and not looks_word_level(pieces)
    assert Spans(tokens_html(pieces)).read() == text
    vocab = [bpe.decode([i]) for i in range(len(bpe))]
    assert not looks_word_level(vocab) and not looks_word_level(bpe.convert_ids_to_tokens(list(range(len(bpe)))))


def test_whitespace_only_tokens_are_visible(bpe):
    ids = bpe(TEXTS[2])["input_ids"]
    for pieces in (bpe.convert_ids_to_tokens(ids), [bpe.decode([i]) for i in ids]):
        spans = Spans(tokens_html(pieces))
        ws = [s for s in spans.spans if "nbf-ws" in s["classes"]]
        assert ws and all(s["shown"].strip() for s in ws)  # a glyph, not invisible whitespace
    html = tokens_html(["a", "Ġ", "Ċ", "ĉ", "b"])
    assert "·" in html and "↵\n" not in html and "↵</span>\n" in html and "→" in html  # the newline still breaks the line
    assert Spans(html).read() == "a \n\tb"


# ----------------------------------------------------------------------------- SentencePiece and specials


def test_sentencepiece_pieces_and_byte_tokens():
    pieces = ["<s>", "▁Mia", "▁was", "▁happy", "<0x0A>", "▁She", "<0xE2>", "<0x80>", "<0x99>", "s", "▁", "▁here", "</s>"]
    assert not looks_word_level(pieces)
    spans = Spans(tokens_html(pieces))
    assert len(spans.spans) == len(pieces)
    assert spans.read() == " Mia was happy\n She’s  here"
    assert [("nbf-special" in s["classes"]) for s in spans.spans] == [True] + [False] * 11 + [True]
    assert "nbf-ws" in spans.spans[10]["classes"] and spans.spans[10]["shown"] == "G"


def llama_style_tokenizer():
    """A SentencePiece-style BPE (Metaspace pieces, byte fallback, Llama's decoder that strips one leading space),
    trained here on a few sentences, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"))  # fmt: skip
    tok.train_from_iterator(["Mia was playing by the sea, and the boat was playing too."] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_tokens_decoded_one_at_a_time_keep_their_spaces():
    tok = llama_style_tokenizer()
    text = "Mia was playing by the sea"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith("▁") for p in pieces) and any(not p.startswith("▁") for p in pieces)  # words and subwords
    alone = [tok.decode([i]) for i in ids]
    assert not any(t.startswith(" ") for t in alone)  # what decoding alone gives: every space lost
    each = decode_each(tok, ids)
    assert [t.startswith(" ") for t in each] == [p.startswith("▁") for p in pieces]
    assert "".join(display_tokens(each)) == " " + text == Spans(tokens_html(each)).read()
    vocab = decode_each(tok, range(len(tok)))  # what token_strings gives a panel
    assert not looks_word_level(vocab) and vocab[tok.convert_tokens_to_ids("▁the")] == " the"
    n = len(tok)  # ids an output embedding padded wider than the tokenizer has (Pythia's): named, in place
    assert decode_each(tok, [n + 1, ids[0], n]) == [f"<{n + 1}>", each[0], f"<{n}>"]


@pytest.mark.parametrize("piece", ["<bos>", "<|endoftext|>", "<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "[CLS]"])
def test_special_tokens_are_dimmed(piece):
    assert is_special(piece)
    (span,) = Spans(tokens_html([piece])).spans
    assert "nbf-special" in span["classes"] and SPECIAL_STYLE in span["style"] and span["text"] == piece


@pytest.mark.parametrize("piece", ["<0x0A>", "<", "a<b", "Ġ<", "<a b>", "[x]"])
def test_not_special(piece):
    assert not is_special(piece)


def test_tokens_are_escaped():
    spans = Spans(html := tokens_html(["<script>", "a&b", "\"q\""]))
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp;" in html
    assert [s["text"].strip() for s in spans.spans] == ["<script>", "a&b", "\"q\""]


# ----------------------------------------------------------------------------- layout and the arguments


def test_text_wraps_inside_its_column():
    (style,) = Spans(tokens_html(["x"] * 300)).containers
    for rule in ("white-space: pre-wrap", "overflow-wrap: anywhere", "word-break: break-word", "max-width: 100%",
                 "min-width: 0"):
        assert rule in style


def test_shade_titles_marks_bold_center():
    spans = Spans(tokens_html(["a", "b", "c"], shade=[0.0, 0.5, 7.0], titles=["t0", "t1", "t2"],
                              marks=[True, "color:#777", None], bold=[False, True, False], center=2)).spans
    assert "rgba(255,127,14,0.00)" in spans[0]["style"] and "rgba(255,127,14,0.50)" in spans[1]["style"]
    assert "rgba(255,127,14,1.00)" in spans[2]["style"]  # clipped to [0, 1]
    assert STEERED_STYLE in spans[0]["style"] and "color:#777" in spans[1]["style"]
    assert BOLD_STYLE in spans[1]["style"] and BOLD_STYLE not in spans[0]["style"]
    assert "outline" in spans[2]["style"] and "outline" not in spans[1]["style"]
    assert spans[1]["title"] == "t1 · 'b'"
    assert all("border-right" in s["style"] for s in spans)  # the boundary hairline


@pytest.mark.parametrize("arg", ["shade", "titles", "marks", "bold"])
def test_per_token_arguments_need_one_entry_per_token(arg):
    with pytest.raises(ValueError, match=rf"{arg} must have one entry per token \(2\), got 3"):
        tokens_html(["a", "b"], **{arg: [1, 1, 1]})
    with pytest.raises(ValueError, match="center must be None or a token index"):
        tokens_html(["a"], center="0")
