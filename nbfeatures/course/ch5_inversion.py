"""Chapter 5, InversionView: checkers for course/masters/05_inversion.py, on the shipped `counting` model and its decoder.

    D(f(x), z) = min over the positions t that x has of ||f(x)_t - z|| / ||z||        preimage_eps(z) = {x : D <= eps}
    candidates x ~ p(x | z, site) from the decoder at a temperature, re-run through the probed model, measured by D
    kept = among the well-formed in-eps candidates, the fraction with the query's count, and with the query's letter

The counting model reads `letters|c:` and writes how often c occurs (Huang et al. 2024, §4). Each reference is the
library's own answer (inversion.distance; generate, read_sites and real_positions; Counting.parse).

Dimension key: B candidates, T position, D activation width (64), N samples.
"""

from __future__ import annotations

import functools
import math

import plotly.graph_objects as go
import torch
from torch import Tensor

from .. import plots, sites, zoo
from ..data import Counting
from ..inversion import InversionDecoder, distance, generate, load_decoder, query_activation, read_sites, real_positions, sample
from .checking import CheckFailed, Mistake, call, compare, quietly, register

chapter = register("ch5_inversion", "InversionView")
SITE, EPS = "blocks.1.hook_attn_out", 0.1  # layer 1's attention output, read at ':' where the model must answer
task = Counting()


# ----------------------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=1)
def counting() -> sites.Model:
    """The checkers' own copy of the shipped counting model (2 layers, 1 head, d = 64), loaded once, quietly."""
    with quietly():
        return zoo.load_model("counting")


@functools.lru_cache(maxsize=1)
def decoder() -> InversionDecoder:
    """The shipped InversionView decoder of the counting model."""
    with quietly():
        return load_decoder(zoo.path("counting") / "inversion")


def query(seed: int, b: int = 0) -> tuple[Tensor, int]:
    """(a held-out query's ids [T], BOS first and ending with its count digit; the position of its ':')."""
    ids, colon, _ = task.sample(b + 1, seed=seed)
    return ids[b, : int(colon[b]) + 2].clone(), int(colon[b])


def encode(text: str) -> Tensor:
    """Counting text without BOS ('abbacb|b:3') -> ids [T] with BOS first."""
    return torch.tensor([task.special_id, *(task.vocab.index(ch) for ch in text)])


# ----------------------------------------------------------------------------- 5.1 the epsilon-distance


def ref_inversion_distance(z_D: Tensor, acts_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    return distance(z_D, acts_BTD, mask_BT)[0]


def _dist(z: Tensor, acts: Tensor, mask: Tensor, *, how: str = "query", reduce: str = "min", masked: bool = True) -> Tensor:
    diff = (acts - z).norm(dim=-1)
    d_BT = {"query": diff / z.norm(), "none": diff, "sample": diff / acts.norm(dim=-1), "squared": (diff / z.norm()) ** 2,
            "cosine": 1 - torch.nn.functional.cosine_similarity(acts, z.expand_as(acts), dim=-1)}[how]  # fmt: skip
    if reduce == "mean":
        return (d_BT * mask).sum(-1) / mask.sum(-1)
    d_BT = d_BT.masked_fill(~mask, math.inf) if masked else d_BT
    return d_BT if reduce == "none" else d_BT.min(-1).values


DISTANCE_MISTAKES = [
    Mistake("your distance is not normalised", "divide ||a_t - z|| by the query's norm ||z||: epsilon = 0.1 means within "
            "10% of the query's size at every site", lambda z, a, m: _dist(z, a, m, how="none")),
    Mistake("you normalised by the sample's norm ||a_t||", "normalise by the query's norm ||z||: the query is fixed, the "
            "samples vary", lambda z, a, m: _dist(z, a, m, how="sample")),
    Mistake("you computed the cosine distance 1 - cos(a_t, z)", "the library's default is the normalised Euclidean "
            "distance ||a_t - z|| / ||z||, which also sees the norm", lambda z, a, m: _dist(z, a, m, how="cosine")),
    Mistake("you squared the distance", "||a_t - z|| / ||z||, a norm, not its square", lambda z, a, m: _dist(z, a, m, how="squared")),
    Mistake("you averaged over positions", "take the minimum: a sample is in the preimage if its activation comes "
            "within epsilon at some position", lambda z, a, m: _dist(z, a, m, reduce="mean")),
    Mistake("you ignored the mask: a padding position can be the nearest", "set the distance at masked positions to "
            "inf (d.masked_fill(~mask_BT, float('inf'))) before the min", lambda z, a, m: _dist(z, a, m, masked=False)),
    Mistake("you returned the distance at every position", "take the minimum over positions: one distance per sample [B]",
            lambda z, a, m: _dist(z, a, m, reduce="none")),
]  # fmt: skip


def _counting_acts() -> tuple[Tensor, Tensor, Tensor]:
    """(z at ':' of the notebook's query, activations [5, 33, 64] of 4 other inputs and the query itself, their mask)."""
    q, colon = query(2026)
    z = query_activation(counting(), q, SITE, colon)
    ids = task.sample(4, seed=3)[0]
    ids = torch.cat([ids, torch.nn.functional.pad(q, (0, ids.shape[1] - len(q)))[None]])
    return z, read_sites(counting(), ids, [SITE])[SITE], real_positions(ids, task.special_id)


@chapter.exercise("5.1", "inversion_distance", goal="the epsilon-distance: how near a sample's activations come to the query's",
                  difficulty=1, minutes=10)  # fmt: skip
def check_inversion_distance(inversion_distance) -> str:
    g = torch.Generator().manual_seed(0)
    z1, a1 = torch.randn(8, generator=g), torch.randn(3, 5, 8, generator=g)
    m1 = torch.arange(5) < torch.tensor([5, 3, 4])[:, None]
    z3, a3 = 5 * torch.randn(16, generator=g), torch.randn(2, 6, 16, generator=g)
    m3 = torch.arange(6) < torch.tensor([4, 6])[:, None]
    a3[0, 5] = z3  # the query itself, at a padding position
    zc, ac, mc = _counting_acts()
    cases = [("random z [8], activations [3, 5, 8] of 5, 3 and 4 positions", z1, a1, m1),
             ("z at ':' of a counting query (blocks.1.hook_attn_out), 4 inputs and the query itself", zc, ac, mc),
             ("z = 5 N(0, 1) [16], a copy of z at a padding position", z3, a3, m3)]  # fmt: skip
    for case, z, a, m in cases:
        got = call(inversion_distance, z.clone(), a.clone(), m.clone(), case=case)
        compare(got, ref_inversion_distance(z, a, m), case=case, args=(z, a, m), mistakes=DISTANCE_MISTAKES)
    return f"equals inversion.distance on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 5.2 sampling and re-running


def _sample(dec, model, site: str, q: Tensor, pos: int, temperature: float, n: int, seed: int, *, z_pos=None,
            at_query_position: bool = False, masked: bool = True, how: str = "query") -> Tensor:  # fmt: skip
    z = query_activation(model, q, site, pos if z_pos is None else z_pos)
    ids = generate(dec, z, site, n, temperature, torch.Generator().manual_seed(seed))
    acts = read_sites(model, ids, [site])[site]
    mask = real_positions(ids, dec.cfg.eos_id)
    if at_query_position:
        return (acts[:, pos] - z).norm(dim=-1) / z.norm()
    return _dist(z, acts, mask, how=how, masked=masked)


def ref_sample_distances(dec, model, site: str, query_T: Tensor, position: int, temperature: float, n: int, seed: int) -> Tensor:
    return _sample(dec, model, site, query_T, position, temperature, n, seed)


def _sorted(fn):
    return lambda *a: fn(*a).sort().values


SAMPLE_MISTAKES = [
    Mistake("you ignored the temperature (these are the distances of samples drawn at temperature 1)",
            "pass it on: generate(decoder, z, site, n, temperature, generator)",
            _sorted(lambda d, m, s, q, p, t, n, seed: _sample(d, m, s, q, p, 1.0, n, seed))),
    Mistake("your query activation is at the query's last token (its count digit)", "read z at `position` (the ':'): "
            "nbf.inversion.query_activation(model, query_T, site, position)",
            _sorted(lambda d, m, s, q, p, t, n, seed: _sample(d, m, s, q, p, t, n, seed, z_pos=-1))),
    Mistake("you measured each sample at the query's position only", "a sample may encode the same thing elsewhere: "
            "take the minimum over all its positions, as in 5.1",
            _sorted(lambda d, m, s, q, p, t, n, seed: _sample(d, m, s, q, p, t, n, seed, at_query_position=True))),
    Mistake("you ignored the padding after each sample's end", "mask it: real_positions(ids, decoder.cfg.eos_id) marks "
            "the positions before the first EOS", _sorted(lambda *a: _sample(*a, masked=False))),
    Mistake("your distance is not normalised", "divide by ||z||, as in 5.1", _sorted(lambda *a: _sample(*a, how="none"))),
]  # fmt: skip


@chapter.exercise("5.2", "sample_distances", goal="sample inputs from the decoder and measure each in the probed model",
                  difficulty=2, minutes=20)  # fmt: skip
def check_sample_distances(sample_distances) -> str:
    dec, m = decoder(), counting()
    q1, c1 = query(2026)
    q2, c2 = query(7, 1)
    q3, c3 = query(11)
    cases = [(f"the query {task.text(q1)!r} at ':' ({SITE}), temperature 1, 16 samples, seed 0", SITE, q1, c1, 1.0, 16, 0),
             (f"the query {task.text(q2)!r} at ':', temperature 0.5, 12 samples, seed 1", SITE, q2, c2, 0.5, 12, 1),
             (f"the query {task.text(q3)!r} at its target letter (blocks.0.hook_resid_post), temperature 2, 8 samples, seed 2",
              "blocks.0.hook_resid_post", q3, c3 - 1, 2.0, 8, 2)]  # fmt: skip
    for case, site, q, pos, t, n, seed in cases:
        args = (dec, m, site, q, pos, t, n, seed)
        got = call(sample_distances, dec, m, site, q.clone(), pos, t, n, seed, case=case)
        if isinstance(got, Tensor) and got.dim() == 1:
            got = got.detach().float().sort().values  # in any order
        compare(got, ref_sample_distances(*args).sort().values, case=case, args=args, mistakes=SAMPLE_MISTAKES, atol=1e-4)
    return f"the distances of the same samples as generate + read_sites + distance on {len(cases)} queries"


def samples_figure(n_per_temperature: int = 8) -> go.Figure:
    """The closest 20 samples of the notebook's query, drawn by the library: the expected picture of 5.2."""
    q, colon = query(2026)
    out = sample(decoder(), counting(), SITE, query=q, position=colon, temperatures=(0.5, 1.0, 2.0),
                 n_per_temperature=n_per_temperature, epsilon=EPS, seed=0)  # fmt: skip
    show = task.vocab
    return plots.inversion_samples([[show[t] for t in row] for row in out.tokens[:20]], out.distance[:20].tolist(),
                                   [c.tolist() for c in out.colour[:20]], out.position[:20].tolist(), EPS,
                                   title=f"closest 20 of {len(out.tokens)} samples for {task.text(q)!r} at ':' ({SITE}); "
                                         f"{out.inside_fraction:.0%} inside ε = {EPS}")  # fmt: skip


# ----------------------------------------------------------------------------- 5.3 what layer 1's attention keeps


def _kept(task_: Counting, q: Tensor, tokens, inside: Tensor, *, use_inside: bool = True, drop_bad: bool = True,
          written: bool = False, query_letter: bool = False, counts: bool = False) -> Tensor:  # fmt: skip
    want = task_.parse(q)
    chosen = [t for t, k in zip(tokens, inside.tolist()) if k or not use_inside]
    parsed = [task_.parse(t) for t in chosen]
    ok = [p for p in parsed if p is not None]
    if not ok:
        return torch.full((2,), math.nan)
    if query_letter:
        same_count = [p["letters"].count(want["target"]) == want["true_count"] for p in ok]
    else:
        same_count = [(p["count"] if written else p["true_count"]) == want["true_count"] for p in ok]
    same = torch.tensor([sum(same_count), sum(p["target"] == want["target"] for p in ok)], dtype=torch.float)
    return same if counts else same / (len(ok) if drop_bad else len(parsed))


def ref_kept_fractions(task_: Counting, query_T: Tensor, tokens: list[list[int]], inside_N: Tensor) -> Tensor:
    return _kept(task_, query_T, tokens, inside_N)


KEPT_MISTAKES = [
    Mistake("you counted every sample, not only those inside epsilon", "keep the samples whose `inside` is True: only "
            "they are in the preimage", lambda *a: _kept(*a, use_inside=False)),
    Mistake("you counted ill-formed samples as not keeping", "leave out the samples task.parse cannot read (it returns "
            "None): divide by the well-formed in-epsilon samples", lambda *a: _kept(*a, drop_bad=False)),
    Mistake("you compared the digit the sample wrote after ':'", "what the sample encodes is how often its letter "
            "occurs in it: compare parse(...)['true_count'] with the query's", lambda *a: _kept(*a, written=True)),
    Mistake("you counted the query's letter in each sample", "count the sample's own target letter: parse(sample)"
            "['true_count']", lambda *a: _kept(*a, query_letter=True)),
    Mistake("you returned how many samples, not what fraction", "divide by the number of well-formed in-epsilon samples",
            lambda *a: _kept(*a, counts=True)),
    Mistake("your two fractions are swapped", "return [same count, same letter]", lambda *a: _kept(*a).flip(0)),
    Mistake("with no well-formed sample inside epsilon the fractions are undefined, not 0", "return NaN for both "
            "(torch.full((2,), float('nan')))", lambda *a: torch.zeros(2) if bool(_kept(*a).isnan().all()) else _kept(*a)),
]  # fmt: skip


@functools.lru_cache(maxsize=None)
def _sampled(seed: int, b: int, n_per_temperature: int = 8) -> tuple[Tensor, list[list[int]], Tensor]:
    """(query ids, sample tokens, inside) of the library's sampler at ':' of a held-out query, temperatures 0.5, 1, 2."""
    q, colon = query(seed, b)
    out = sample(decoder(), counting(), SITE, query=q, position=colon, temperatures=(0.5, 1.0, 2.0),
                 n_per_temperature=n_per_temperature, epsilon=EPS, seed=b)  # fmt: skip
    return q, out.tokens, out.inside


def _hand_made() -> tuple[Tensor, list[list[int]], Tensor]:
    texts = [("bbbdd|b:3", True), ("ddd|d:3", True), ("bdb|b:2", True), ("eeef|e:5", True), ("ab|", True), ("|b:3", True),
             ("bbb|b:3", False), ("cc|c:2", False)]  # fmt: skip
    return encode("abcbcbac|b:3"), [encode(t).tolist() for t, _ in texts], torch.tensor([k for _, k in texts])


@chapter.exercise("5.3", "kept_fractions", goal="what the in-epsilon samples share with the query: its count? its letter?",
                  difficulty=2, minutes=15)  # fmt: skip
def check_kept_fractions(kept_fractions) -> str:
    qh, th, kh = _hand_made()
    cases = [("8 hand-made samples of 'abcbcbac|b:3': 6 inside (2 ill-formed), 2 outside", qh, th, kh),
             *[(f"24 decoder samples for {task.text(q)!r}", q, t, k) for q, t, k in (_sampled(7, 0), _sampled(7, 3))],
             ("the hand-made samples, none inside", qh, th, torch.zeros(len(th), dtype=torch.bool))]  # fmt: skip
    for case, q, tokens, inside in cases:
        got = call(kept_fractions, task, q.clone(), [list(t) for t in tokens], inside.clone(), case=case)
        compare(got, ref_kept_fractions(task, q, tokens, inside), case=case, args=(task, q, tokens, inside), mistakes=KEPT_MISTAKES)
    return f"[same count, same letter] of the in-ε samples on {len(cases)} inputs"


def kept_figure(n_queries: int = 6, seed: int = 7) -> go.Figure:
    """Of the in-epsilon samples of held-out queries, how many keep the count and the letter: the expected picture of 5.3."""
    rows = [ref_kept_fractions(task, *_sampled(seed, b)) for b in range(n_queries)]
    kept = torch.stack(rows).nanmean(0).tolist()
    inside = sum(float(_sampled(seed, b)[2].float().mean()) for b in range(n_queries)) / n_queries
    x = ["same count", "same letter"]
    fig = go.Figure([go.Bar(x=x, y=kept, name="in-ε samples (the library's sampler)"),
                     go.Bar(x=x, y=[1 / task.max_count, 1 / task.n_letters], name="chance")])  # fmt: skip
    return fig.update_layout(title=f"What survives at ':' after layer 1's attention ({SITE}): {n_queries} held-out queries, "
                                   f"24 samples each, {inside:.0%} inside ε", barmode="group", yaxis_range=[0, 1], height=340)  # fmt: skip


def attention_figure(n: int = 64, seed: int = 5) -> go.Figure:
    """Layer 1's attention from ':' on one query, and its mean weight on the target letter over n inputs."""
    ids, colon, _ = task.sample(n, seed=seed)
    pattern = sites.read_acts(counting(), ids, "blocks.1.attn.hook_pattern")["blocks.1.attn.hook_pattern"][:, 0]  # one head
    rows = torch.arange(n)
    on_target = float(pattern[rows, colon, colon - 1].mean())
    c = int(colon[0])
    labels = plots.unique_labels([task.vocab[t] for t in ids[0, : c + 1].tolist()])
    fig = go.Figure(go.Bar(x=labels, y=pattern[0, c, : c + 1].tolist()))
    return fig.update_layout(title=f"Layer 1's attention from ':' in {task.text(ids[0, : c + 2])!r}; over {n} inputs "
                                   f"{on_target:.1%} of it goes to the letter being counted", yaxis_title="attention",
                             height=320)  # fmt: skip


__all__ = ["chapter", "check_inversion_distance", "check_sample_distances", "check_kept_fractions", "samples_figure",
           "kept_figure", "attention_figure", "counting", "decoder", "query", "encode", "task", "SITE", "EPS", "CheckFailed"]  # fmt: skip
