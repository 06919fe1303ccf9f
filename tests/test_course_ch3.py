"""Chapter 3's checkers (codebook features): the master's solution passes, planted wrong implementations fail naming
their mistake, a stub prints its one line.

The reference implementations are the solution cells of course/masters/03_codebook.py, executed here, so the tests
check the checkers against the very code the solutions notebook runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nbfeatures as nbf
from nbfeatures.course import ch3_codebook as ch3
from nbfeatures.data import TokFSM

from course_support import fails, master_solutions, named, passes_and_stub_says_so


@pytest.fixture(scope="module")
def sol():
    """The master's solution functions: code_similarities, codebook_snap, state_labels, best_state_codes, forced_next_states."""
    return master_solutions("03_codebook", F=F, fsm=TokFSM())


NAMES = ["code_similarities", "codebook_snap", "state_labels", "best_state_codes", "forced_next_states"]


@pytest.mark.parametrize("name", NAMES)
def test_ch3_reference_passes_and_stub_prints_the_one_line(sol, name, capsys):
    passes_and_stub_says_so(getattr(ch3, f"check_{name}"), sol[name], capsys)


# ----------------------------------------------------------------------------- 3.1


def ln(x):
    return F.layer_norm(x, (x.shape[-1],))


def test_ch3_code_similarities_names_its_mistakes():
    named(ch3.check_code_similarities, lambda x, c: ln(x) @ F.normalize(c, dim=-1).T, "normalised the codes but not the input")
    named(ch3.check_code_similarities, lambda x, c: F.normalize(ln(x), dim=-1) @ c.T, "normalised the input but not the codes")
    named(ch3.check_code_similarities, lambda x, c: ln(x) @ c.T, "dot product")
    named(ch3.check_code_similarities, lambda x, c: F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T, "raw input")
    named(ch3.check_code_similarities, lambda x, c: F.normalize(c, dim=-1) @ F.normalize(ln(x), dim=-1).T, "transposed")
    named(ch3.check_code_similarities, lambda x, c: -torch.cdist(ln(x), c), "Euclidean")


# ----------------------------------------------------------------------------- 3.2


def snap(*, largest=True, rank="cos", st="ln", detach_codes=False, reduce="sum", unit=False):
    def codebook_snap(x, codebook, k):
        xn = ln(x)
        q = xn if rank != "raw" else x
        sims = (F.normalize(q, dim=-1) @ F.normalize(codebook, dim=-1).T) if rank != "dot" else xn @ codebook.T
        ids = sims.topk(k, dim=-1, largest=largest).indices
        picked = (codebook.detach() if detach_codes else F.normalize(codebook, dim=-1) if unit else codebook)[ids]
        out = picked.sum(-2) if reduce == "sum" else picked.mean(-2)
        if st == "ln":
            return out + (xn - xn.detach())
        if st == "x":
            return out + (x - x.detach())
        return out

    return codebook_snap


def test_ch3_codebook_snap_names_its_mistakes():
    ch3.check_codebook_snap(snap())
    named(ch3.check_codebook_snap, snap(largest=False), "least similar")
    named(ch3.check_codebook_snap, snap(rank="dot"), "dot product")
    named(ch3.check_codebook_snap, snap(reduce="mean"), "averaged")
    named(ch3.check_codebook_snap, snap(st=None), "no straight-through")
    named(ch3.check_codebook_snap, snap(st="x"), "skips the LayerNorm")
    named(ch3.check_codebook_snap, snap(detach_codes=True), "codes get no gradient")
    named(ch3.check_codebook_snap, snap(rank="raw"), "raw input")
    named(ch3.check_codebook_snap, snap(unit=True), "normalised codes")
    named(ch3.check_codebook_snap, lambda x, codebook, k: ln(x), "LayerNorm(x) itself")

    def argmax_one(x, codebook, k):  # k = 1 written with argmax: the same snap
        xn = ln(x)
        ids = (F.normalize(xn, dim=-1) @ F.normalize(codebook, dim=-1).T).topk(k, dim=-1).indices
        return codebook[ids].sum(1) + xn - xn.detach()

    ch3.check_codebook_snap(argmax_one)


# ----------------------------------------------------------------------------- 3.3


def labeller(at=(2,), fill=-1):
    def state_labels(ids, fsm):
        states = fsm.decode(ids)
        out = torch.full(ids.shape, fill)
        for j in range(states.shape[1]):
            for a in at:
                if 2 * j + a < ids.shape[1]:
                    out[:, 2 * j + a] = states[:, j]
        return out

    return state_labels


def test_ch3_state_labels_names_its_mistakes():
    ch3.check_state_labels(labeller())
    named(ch3.check_state_labels, labeller(at=(1,)), "first digit")
    named(ch3.check_state_labels, labeller(at=(0,)), "forgot BOS")
    named(ch3.check_state_labels, labeller(at=(3,)), "token after the state")
    named(ch3.check_state_labels, labeller(at=(1, 2)), "both digits")
    named(ch3.check_state_labels, labeller(fill=0), "left 0")
    named(ch3.check_state_labels, lambda ids, fsm: fsm.decode(ids), "returned the states")


# ----------------------------------------------------------------------------- 3.4


def ranker(by="f1", fires_on="all"):
    def best_state_codes(codes, labels, n_codes, n_states):
        lab = labels.reshape(-1)
        fires = torch.zeros(len(lab), n_codes).scatter_(1, codes.reshape(len(lab), -1), 1.0)
        on = lab >= 0
        hits = torch.zeros(n_states, n_codes).index_add_(0, lab[on], fires[on])
        if by == "count":
            return hits.argmax(1)
        p = hits / (fires[on] if fires_on == "labelled" else fires).sum(0).clamp_min(1)
        if by == "precision":
            return p.argmax(1)
        r = hits / torch.bincount(lab[on], minlength=n_states).clamp_min(1)[:, None]
        return (2 * p * r / (p + r).clamp_min(1e-12)).argmax(1)

    return best_state_codes


def test_ch3_best_state_codes_names_its_mistakes():
    ch3.check_best_state_codes(ranker())
    named(ch3.check_best_state_codes, ranker(by="count"), "activation count")
    named(ch3.check_best_state_codes, ranker(by="precision"), "precision alone")
    named(ch3.check_best_state_codes, ranker(fires_on="labelled"), "only on labelled tokens")

    def library(codes, labels, n_codes, n_states):  # the library's table: a pandas column is accepted
        return nbf.codebook.best_code_per_label(codes, labels, n_codes, n_labels=n_states).code

    ch3.check_best_state_codes(library)
    err = fails(ch3.check_best_state_codes, lambda codes, labels, n_codes, n_states: torch.zeros(n_states, 2, dtype=torch.long))
    assert "one code id per state" in str(err)


# ----------------------------------------------------------------------------- 3.5


def forcer(positions=(2,), first=True, transpose=False, edits=True):
    fsm = TokFSM()

    def forced_next_states(cb, state, forced):
        prefix = torch.tensor([fsm.special_id, *fsm.encode([state]).tolist()])
        batch = torch.cat([prefix.repeat(10, 1), torch.arange(10)[:, None]], 1)
        pos = None if positions is None else list(positions)
        iv = [nbf.ForceCodes(s, cb.layer(s), (c,), positions=pos) for s, c in forced.items()] if edits else []
        with torch.no_grad():
            probs = cb.run(batch, iv).logits[:, -2:].softmax(-1)[..., :10]
        joint = (probs[0, 0][:, None] if first else 1.0) * probs[:, 1]
        return (joint.T if transpose else joint).reshape(100)

    return forced_next_states


def test_ch3_forced_next_states_names_its_mistakes():
    named(ch3.check_forced_next_states, forcer(positions=None), "every position")
    named(ch3.check_forced_next_states, forcer(positions=(-1,)), "last position")
    named(ch3.check_forced_next_states, forcer(positions=(1,)), "first digit")
    named(ch3.check_forced_next_states, forcer(edits=False), "never reached the model")
    named(ch3.check_forced_next_states, forcer(first=False), "p(first digit)")
    named(ch3.check_forced_next_states, forcer(transpose=True), "transposed")


def test_ch3_expected_picture_from_the_reference_and_from_a_student_function(sol):
    ref, mine = ch3.forcing_figure(), ch3.forcing_figure(next_states_fn=sol["forced_next_states"])
    fsm = TokFSM()
    for a, b in zip(ref.data[:2], mine.data[:2]):
        assert a.name == b.name and torch.allclose(torch.tensor(a.y), torch.tensor(b.y), atol=1e-5)
    before, after = (torch.tensor(t.y) for t in ref.data[:2])
    assert before[fsm.edges[40]].sum() > 0.9 and after[fsm.edges[40]].sum() < 0.4  # the mass leaves 40's out-edges
    assert after[fsm.edges[47]].sum() > 4 * before[fsm.edges[47]].sum()  # and goes to 47's
