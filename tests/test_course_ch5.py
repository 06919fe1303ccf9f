"""Chapter 5's checkers (InversionView on the counting model): the master's solutions pass, planted wrong
implementations fail naming their mistake, a stub prints exactly its one line, and the expected pictures show what
the chapter says.

The reference implementations are the solution cells of course/masters/05_inversion.py, executed here, so the tests
check the checkers against the very code the solutions notebook runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nbfeatures as nbf
from nbfeatures.course import ch5_inversion as ch5
from nbfeatures.inversion import generate, query_activation, read_sites, real_positions, sample

from course_support import master_solutions, named, passes_and_stub_says_so


@pytest.fixture(scope="module")
def sol():
    """The master's solution functions: inversion_distance, sample_distances, kept_fractions."""
    return master_solutions("05_inversion")


@pytest.mark.parametrize("name", ["inversion_distance", "sample_distances", "kept_fractions"])
def test_ch5_reference_passes_and_stub_prints_the_one_line(sol, name, capsys):
    passes_and_stub_says_so(getattr(ch5, f"check_{name}"), sol[name], capsys)


def test_ch5_the_library_itself_passes(capsys):
    """The library's sampler, in its own (sorted) order, gives the reference's distances: sample == generate + re-run."""
    ch5.check_inversion_distance(lambda z, a, m: nbf.inversion.distance(z, a, m)[0])

    def by_sample(decoder, model, site, q, pos, t, n, seed):
        return sample(decoder, model, site, query=q, position=pos, temperatures=(t,), n_per_temperature=n, seed=seed).distance

    ch5.check_sample_distances(by_sample)
    assert capsys.readouterr().out.count("passed") == 2


# ----------------------------------------------------------------------------- 5.1


def test_ch5_inversion_distance_names_its_mistakes():
    def dist(z, a, m, how="query", reduce="min", masked=True):
        diff = (a - z).norm(dim=-1)
        d = {"query": diff / z.norm(), "none": diff, "sample": diff / a.norm(dim=-1),
             "cosine": 1 - F.cosine_similarity(a, z.expand_as(a), dim=-1)}[how]  # fmt: skip
        if reduce == "mean":
            return (d * m).sum(-1) / m.sum(-1)
        return (d.masked_fill(~m, math.inf) if masked else d).min(-1).values

    named(ch5.check_inversion_distance, lambda *a: dist(*a, how="none"), "not normalised")
    named(ch5.check_inversion_distance, lambda *a: dist(*a, how="sample"), "sample's norm")
    named(ch5.check_inversion_distance, lambda *a: dist(*a, how="cosine"), "cosine")
    named(ch5.check_inversion_distance, lambda *a: dist(*a, reduce="mean"), "averaged over positions")
    err = named(ch5.check_inversion_distance, lambda *a: dist(*a, masked=False), "ignored the mask")
    assert "padding position" in str(err)  # caught on the case built for it
    named(ch5.check_inversion_distance, lambda z, a, m: ((a - z).norm(dim=-1) / z.norm()).masked_fill(~m, math.inf), "every position")


# ----------------------------------------------------------------------------- 5.2


def test_ch5_sample_distances_names_its_mistakes(sol):
    measure = sol["inversion_distance"]

    def draw(decoder, model, site, q, pos, t, n, seed, *, temperature=None, z_pos=None, at_pos=False, masked=True):
        z = query_activation(model, q, site, pos if z_pos is None else z_pos)
        ids = generate(decoder, z, site, n, t if temperature is None else temperature, torch.Generator().manual_seed(seed))
        acts = read_sites(model, ids, [site])[site]
        mask = real_positions(ids, decoder.cfg.eos_id) if masked else torch.ones(ids.shape, dtype=torch.bool)
        if at_pos:
            return (acts[:, pos] - z).norm(dim=-1) / z.norm()
        return measure(z, acts, mask)

    draw_reversed = lambda *a: draw(*a).flip(0)  # noqa: E731  any order is right
    ch5.check_sample_distances(draw_reversed)
    err = named(ch5.check_sample_distances, lambda *a: draw(*a, temperature=1.0), "temperature")
    assert "temperature 0.5" in str(err)
    named(ch5.check_sample_distances, lambda *a: draw(*a, z_pos=-1), "last token")
    named(ch5.check_sample_distances, lambda *a: draw(*a, at_pos=True), "query's position only")
    named(ch5.check_sample_distances, lambda *a: draw(*a, masked=False), "padding")


# ----------------------------------------------------------------------------- 5.3


def test_ch5_kept_fractions_names_its_mistakes(sol):
    good = sol["kept_fractions"]

    def kept(task, q, tokens, inside, *, use_inside=True, drop_bad=True, written=False, empty=None):
        want = task.parse(q)
        chosen = [task.parse(t) for t, k in zip(tokens, inside.tolist()) if k or not use_inside]
        ok = [p for p in chosen if p is not None]
        if not ok:
            return torch.full((2,), math.nan) if empty is None else empty
        key = "count" if written else "true_count"
        n = len(ok) if drop_bad else len(chosen)
        return torch.tensor([sum(p[key] == want["true_count"] for p in ok) / n, sum(p["target"] == want["target"] for p in ok) / n])

    kept(ch5.task, *ch5._hand_made())  # the planted implementation runs
    ch5.check_kept_fractions(kept)
    named(ch5.check_kept_fractions, lambda *a: kept(*a, use_inside=False), "every sample")
    named(ch5.check_kept_fractions, lambda *a: kept(*a, drop_bad=False), "ill-formed")
    named(ch5.check_kept_fractions, lambda *a: kept(*a, written=True), "digit the sample wrote")
    named(ch5.check_kept_fractions, lambda *a: good(*a).flip(0), "swapped")
    err = named(ch5.check_kept_fractions, lambda *a: kept(*a, empty=torch.zeros(2)), "undefined")
    assert "none inside" in str(err)

    def query_letter(task, q, tokens, inside):
        want = task.parse(q)
        ok = [p for t, k in zip(tokens, inside.tolist()) if k and (p := task.parse(t)) is not None]
        return torch.tensor([sum(p["letters"].count(want["target"]) == want["true_count"] for p in ok),
                             sum(p["target"] == want["target"] for p in ok)]) / len(ok)  # fmt: skip

    named(ch5.check_kept_fractions, query_letter, "query's letter")


# ----------------------------------------------------------------------------- the expected pictures


def test_ch5_expected_pictures():
    same_count, same_letter = ch5.kept_figure(n_queries=4).data[0].y
    assert same_count >= 0.6 and same_count > 2 * same_letter  # the count survives at ':', the letter hardly
    weights = ch5.attention_figure(n=16).data[0].y
    assert weights[-2] > 0.9  # layer 1's head at ':' reads the letter being counted
    fig = ch5.samples_figure(n_per_temperature=4)
    assert "inside ε" in fig.layout.title.text
