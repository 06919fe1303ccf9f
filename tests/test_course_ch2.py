"""Chapter 2's checkers (TopK SAEs): the master's solution passes, planted wrong implementations fail naming their
mistake, a stub prints its one line.

The reference implementations are the solution cells of course/masters/02_topk.py, executed here, so the tests check
the checkers against the very code the solutions notebook runs.
"""

from __future__ import annotations

import pytest
import torch

from nbfeatures.course import ch2_topk as ch2

from course_support import master_solutions, passes_and_stub_says_so
from course_support import named as _named


def named(check, fn, words: str):
    return _named(check, fn, words, where="\n    (")  # this chapter's second lines say where, not always "on"


@pytest.fixture(scope="module")
def sol():
    """The master's solution functions: topk_encode, train_step, dead_fraction, auxk_loss."""
    return master_solutions("02_topk")


@pytest.mark.parametrize("name", ["topk_encode", "train_step", "dead_fraction", "auxk_loss"])
def test_ch2_reference_passes_and_stub_prints_the_one_line(sol, name, capsys):
    passes_and_stub_says_so(getattr(ch2, f"check_{name}"), sol[name], capsys)


# ----------------------------------------------------------------------------- 2.1


def encoder(*, shift=-1.0, relu=True, dim=-1, dense=True, topk=True):
    def topk_encode(x, W_enc, b_enc, b_dec, k):
        pre = (x + shift * b_dec) @ W_enc + b_enc
        if not topk:
            return pre.relu()
        top = pre.topk(k, dim=dim)
        values = top.values.relu() if relu else top.values
        return torch.zeros_like(pre).scatter(dim, top.indices, values) if dense else values

    return topk_encode


def test_ch2_topk_encode_names_its_mistakes():
    ch2.check_topk_encode(encoder())
    named(ch2.check_topk_encode, encoder(relu=False), "negative pre-activations")
    named(ch2.check_topk_encode, encoder(shift=0.0), "forgot to subtract b_dec")
    named(ch2.check_topk_encode, encoder(dim=0), "over the batch")
    named(ch2.check_topk_encode, encoder(dense=False), "the k values")
    named(ch2.check_topk_encode, encoder(topk=False), "every positive pre-activation")
    named(ch2.check_topk_encode, encoder(shift=1.0), "added b_dec")

    def relu_first(x, W_enc, b_enc, b_dec, k):  # topk(relu(pre)) is the same map: not a mistake
        pre = ((x - b_dec) @ W_enc + b_enc).relu()
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    ch2.check_topk_encode(relu_first)


# ----------------------------------------------------------------------------- 2.2


def stepper(*, zero=True, backward=True, step=True, renorm="after", loss="fvu"):
    def train_step(sae, optimizer, x):
        if zero:
            optimizer.zero_grad()
        x_hat = sae(x).x_hat
        value = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum() if loss == "fvu" else ((x_hat - x) ** 2).mean()
        if backward:
            value.backward()
        with torch.no_grad():
            if renorm == "before":
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
            if step:
                optimizer.step()
            if renorm == "after":
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
            if renorm == "columns":
                sae.W_dec /= sae.W_dec.norm(dim=0, keepdim=True)
        return value.item()

    return train_step


def test_ch2_train_step_names_its_mistakes():
    named(ch2.check_train_step, stepper(zero=False), "zero_grad")
    named(ch2.check_train_step, stepper(renorm=None), "not renormalised")
    named(ch2.check_train_step, stepper(renorm="before"), "before optimizer.step()")
    named(ch2.check_train_step, stepper(renorm="columns"), "columns")
    named(ch2.check_train_step, stepper(loss="mse"), "plain MSE")
    named(ch2.check_train_step, stepper(backward=False), "no gradient had reached")
    named(ch2.check_train_step, stepper(step=False), "never called optimizer.step()")


def test_ch2_train_step_accepts_the_librarys_projected_gradient():
    def library_hooks(sae, optimizer, x):
        optimizer.zero_grad()
        x_hat = sae(x).x_hat
        loss = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        loss.backward()
        sae.before_step_()  # the gradient's component along each decoder row removed, as train_sae does
        optimizer.step()
        sae.after_step_()
        return loss

    ch2.check_train_step(library_hooks)


# ----------------------------------------------------------------------------- 2.3


def counter(how):
    def dead_fraction(sae, x, batch_size):
        with torch.no_grad():
            outs = [sae(b) for b in x.split(batch_size)]
        if how == "per batch":
            return sum(float((o.latents == 0).all(0).float().mean()) for o in outs) / len(outs)
        if how == "last batch":  # the count reset on every batch
            return float((outs[-1].latents == 0).all(0).float().mean())
        if how == "pre":
            fired = torch.stack([(o.pre_acts > 0).any(0) for o in outs]).any(0)
            return float((~fired).float().mean())
        fired = torch.stack([(o.latents > 0).any(0) for o in outs]).any(0)
        return float(fired.float().mean()) if how == "alive" else int((~fired).sum())

    return dead_fraction


def test_ch2_dead_fraction_names_its_mistakes():
    named(ch2.check_dead_fraction, counter("per batch"), "per batch")
    named(ch2.check_dead_fraction, counter("pre"), "pre-activations")
    named(ch2.check_dead_fraction, counter("alive"), "fired")
    named(ch2.check_dead_fraction, counter("count"), "number of dead latents")
    named(ch2.check_dead_fraction, counter("last batch"), "last batch")


def test_ch2_dead_by_window_figure_falls_with_the_window():
    y = ch2.dead_by_window_figure().data[0].y
    assert all(a > b for a, b in zip(y, y[1:])) and y[0] > 0.3 > y[-1], y


# ----------------------------------------------------------------------------- 2.4


def aux(*, target="residual", among="dead", scale=1 / 32, detach=True, zero=True, item=False, norm="fvu", clamp=True):
    def auxk_loss(x, x_hat, pre, dead, W_dec, k_aux):
        k = min(k_aux, int(dead.sum())) if among == "dead" and clamp else k_aux
        if int(dead.sum()) == 0 and zero:
            return pre.sum() * 0.0
        e = x - x_hat
        e = e.detach() if detach else e
        masked = pre.masked_fill(~dead, float("-inf")) if among == "dead" else pre
        top = masked.topk(k, dim=-1)
        values = top.values if clamp else pre.gather(-1, top.indices)  # unclamped: live latents fill the -inf slots
        e_hat = torch.zeros_like(pre).scatter(-1, top.indices, values.relu()) @ W_dec
        goal = x if target == "x" else e
        spread = {"fvu": ((goal - goal.mean(0)) ** 2).sum(), "mse": goal.numel()}[norm]
        loss = scale * ((e_hat - goal) ** 2).sum() / spread
        return loss.item() if item else loss

    return auxk_loss


def test_ch2_auxk_loss_names_its_mistakes():
    ch2.check_auxk_loss(aux())
    named(ch2.check_auxk_loss, aux(target="x"), "instead of the residual")
    named(ch2.check_auxk_loss, aux(among="all"), "among all latents")
    named(ch2.check_auxk_loss, aux(scale=1.0), "scale 1/32")
    named(ch2.check_auxk_loss, aux(detach=False), "not detached")
    named(ch2.check_auxk_loss, aux(zero=False), "no dead latent")
    named(ch2.check_auxk_loss, aux(item=True), "no gradient")
    named(ch2.check_auxk_loss, aux(norm="mse"), "plain MSE")
    named(ch2.check_auxk_loss, aux(clamp=False), "fewer dead latents than k_aux")
