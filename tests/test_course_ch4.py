"""Chapter 4's checkers (end-to-end SAEs and binary autoencoders): the master's solutions pass, planted wrong
implementations fail naming their mistake, a stub prints exactly its one line, and the expected pictures show what
the chapter says.

The reference implementations are the solution cells of course/masters/04_e2e_bae.py, executed here, so the tests
check the checkers against the very code the solutions notebook runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nbfeatures as nbf
from nbfeatures.course import ch4_e2e_bae as ch4

from nbfeatures.course.checking import student_hooks
from course_support import master_solutions, named, passes_and_stub_says_so


@pytest.fixture(scope="module")
def sol():
    """The master's solution functions: kl_clean_to_spliced, e2e_loss, binary_step, minibatch_entropy."""
    return master_solutions("04_e2e_bae")


@pytest.mark.parametrize("name", ["kl_clean_to_spliced", "e2e_loss", "binary_step", "minibatch_entropy"])
def test_ch4_reference_passes_and_stub_prints_the_one_line(sol, name, capsys):
    passes_and_stub_says_so(getattr(ch4, f"check_{name}"), sol[name], capsys)


def test_ch4_the_library_itself_passes(capsys):
    from nbfeatures.sae.binary import binary_step, minibatch_entropy
    from nbfeatures.sae.e2e import kl_clean_to_spliced

    ch4.check_kl_clean_to_spliced(kl_clean_to_spliced)
    ch4.check_binary_step(lambda z: binary_step(z, "sigmoid_ste"))
    ch4.check_minibatch_entropy(minibatch_entropy)
    assert capsys.readouterr().out.count("passed") == 3


# ----------------------------------------------------------------------------- 4.1


@pytest.mark.filterwarnings("ignore:reduction")
def test_ch4_kl_names_its_mistakes():
    def kl(c, s, how="right"):
        lp, lq = c.log_softmax(-1), s.log_softmax(-1)
        if how == "reversed":
            lp, lq = lq, lp
        per_token = (lp.exp() * (lp - lq)).sum(-1)
        return {"right": per_token.mean(), "reversed": per_token.mean(), "sum": per_token.sum()}[how]

    named(ch4.check_kl_clean_to_spliced, lambda c, s: kl(c, s, "reversed"), "reversed")
    named(ch4.check_kl_clean_to_spliced, lambda c, s: kl(c, s, "sum"), "summed the KL over positions")
    named(ch4.check_kl_clean_to_spliced, lambda c, s: (c.softmax(-1) * (c - s)).sum(-1).mean(), "logits")
    named(ch4.check_kl_clean_to_spliced, lambda c, s: F.kl_div(s.log_softmax(-1), c.softmax(-1), reduction="mean"), "vocabulary")
    named(ch4.check_kl_clean_to_spliced, lambda c, s: F.kl_div(s.log_softmax(-1), c.softmax(-1), reduction="batchmean"), "batch size")
    named(ch4.check_kl_clean_to_spliced, lambda c, s: F.kl_div(s, c.softmax(-1), reduction="none").sum(-1).mean(), "F.kl_div")
    err = named(ch4.check_kl_clean_to_spliced,
                lambda c, s: (c.softmax(-1) * (c.softmax(-1).log() - s.softmax(-1).log())).sum(-1).mean(), "underflows")
    assert "large logits" in str(err)  # passes the ordinary cases, caught on the edge case
    err = named(ch4.check_kl_clean_to_spliced, lambda c, s: kl(c, s).item(), "no gradient")
    assert "requiring grad" in str(err)


# ----------------------------------------------------------------------------- 4.2


def test_ch4_e2e_loss_names_its_mistakes(sol):
    kl = sol["kl_clean_to_spliced"]

    def loss(model, sae, ids, site, *, first=False, reverse=False, no_grad=False, pre=True, leak=False):
        with torch.no_grad():
            clean = nbf.run(model, ids).logits
        layer = int(site.split(".")[1])
        block = nbf.unwrap(model).transformer.h[layer]
        if pre:  # by hand: replace the block's input
            handle = block.register_forward_pre_hook(lambda m, args: (sae(args[0]).x_hat, *args[1:]))
        else:  # a forward hook replaces the block's output instead
            handle = block.register_forward_hook(lambda m, i, o: sae(o).x_hat)
        try:
            with torch.set_grad_enabled(not no_grad):
                spliced = nbf.unwrap(model)(ids).logits
        finally:
            if not leak:
                handle.remove()
        s = slice(0, None) if first else slice(1, None)
        c, sp = clean[:, s], spliced[:, s]
        return kl(sp, c) if reverse else kl(c, sp)

    ch4.check_e2e_loss(loss)  # the raw-hook route is right too
    named(ch4.check_e2e_loss, lambda *a: loss(*a, first=True), "first position")
    named(ch4.check_e2e_loss, lambda *a: loss(*a, reverse=True), "reversed")
    named(ch4.check_e2e_loss, lambda *a: loss(*a, pre=False), "block's output")
    named(ch4.check_e2e_loss, lambda *a: loss(*a, no_grad=True), "no gradient")
    named(ch4.check_e2e_loss, lambda *a: loss(*a, leak=True), "still registered")
    assert student_hooks(ch4.stories()) == {}  # the leaked hook was removed

    def clean_twice(model, sae, ids, site):
        with torch.no_grad():
            clean = nbf.run(model, ids).logits
        return kl(clean[:, 1:], nbf.run(model, ids).logits[:, 1:])

    named(ch4.check_e2e_loss, clean_twice, "the same model")


# ----------------------------------------------------------------------------- 4.3


def test_ch4_binary_step_names_its_mistakes():
    def surrogate(z, soft):
        return (z > 0).float() + soft - soft.detach()

    named(ch4.check_binary_step, lambda z: (z > 0).float(), "no gradient flows")
    named(ch4.check_binary_step, lambda z: torch.sign(z) + torch.sigmoid(z) - torch.sigmoid(z).detach(), "sign(z)")
    named(ch4.check_binary_step, lambda z: torch.sigmoid(z), "not binary")
    named(ch4.check_binary_step, lambda z: (torch.sigmoid(z) > 0).float() + z - z.detach(), "always positive")
    err = named(ch4.check_binary_step, lambda z: (z >= 0).float() + torch.sigmoid(z) - torch.sigmoid(z).detach(), "exactly 0")
    assert "exact zeros" in str(err)
    named(ch4.check_binary_step, lambda z: surrogate(z, z), "straight through unchanged")
    named(ch4.check_binary_step, lambda z: surrogate(z, z * torch.sigmoid(z).detach()), "by sigmoid(z), not by its derivative")

    class Reference(torch.autograd.Function):  # the BAE reference code's estimator: g (1 - g)
        @staticmethod
        def forward(ctx, z):
            return (z > 0).float()

        @staticmethod
        def backward(ctx, g):
            return g * (1 - g)

    named(ch4.check_binary_step, Reference.apply, "reference code")


# ----------------------------------------------------------------------------- 4.4


def test_ch4_minibatch_entropy_names_its_mistakes():
    def hb(p, log=torch.log2, eps=1e-10):
        return -(p * log(p + eps) + (1 - p) * log(1 - p + eps))

    err = named(ch4.check_minibatch_entropy, lambda b: hb(b.float().mean(0), eps=0.0).sum(), "0 log 0")
    assert "never on" in str(err)
    named(ch4.check_minibatch_entropy, lambda b: hb(b.float().mean(0), log=torch.log).sum(), "natural log")
    named(ch4.check_minibatch_entropy, lambda b: hb(b.float().sum(0)).sum(), "counts, not of the firing rates")
    named(ch4.check_minibatch_entropy, lambda b: hb(b.float().mean(0)).mean(), "averaged")
    named(ch4.check_minibatch_entropy, lambda b: hb(b.float().mean(1)).sum(), "per token")
    named(ch4.check_minibatch_entropy, lambda b: -(b.float().mean(0) * torch.log2(b.float().mean(0) + 1e-10)).sum(), "(1 - p)")
    named(ch4.check_minibatch_entropy, lambda b: hb(b.float()).sum(), "each activation")
    named(ch4.check_minibatch_entropy, lambda b: torch.tensor(float(hb(b.detach().float().mean(0)).sum())), "no gradient")


# ----------------------------------------------------------------------------- the expected pictures


def test_ch4_expected_pictures():
    kl = {t.name.split(" ")[0]: t.y for t in ch4.kl_figure(ks=(4, 8)).data}
    assert all(e < 0.8 * l for l, e in zip(kl["local"], kl["e2e"])), kl  # e2e costs the model less at equal L0 (0.22x, 0.36x)
    forward, sigmoid_grad, ste_grad = (t.y for t in ch4.step_figure().data)
    assert set(forward) == {0.0, 1.0} and max(sigmoid_grad) == pytest.approx(0.25) and min(ste_grad) == 1.0
    entropy = ch4.entropy_figure().data[0].y
    assert all(a < b for a, b in zip(entropy, entropy[1:])), entropy  # entropy grows with depth
