"""Chapter 2, TopK sparse autoencoders: checkers for course/masters/02_topk.py, on activations of the shipped `stories`
model at blocks.1.hook_resid_pre, where the shipped TopK SAE `local_k8` (512 latents, k = 8) reads.

    pre = (x - b_dec) W_enc + b_enc        latents = relu(topk_k(pre))  (per token, over the latents)
    x_hat = latents W_dec + b_dec          FVU = sum (x_hat - x)^2 / sum (x - mean_N x)^2
    one step: zero the gradients, FVU backward, optimizer.step(), then each row of W_dec back to unit norm
    dead fraction = share of the F latents that fired on no token of the whole window
    AuxK = 1/32 FVU(e_hat, e),  e = stopgrad(x - x_hat),  e_hat = relu(top_{k_aux} of pre among the dead latents) W_dec

The references are the library's own answers (TopKSAE.encode, metrics.dead_fraction, sae.base.auxk_loss); the
training step is checked by what it does: the gradient the optimiser applies, the decoder's row norms after the
step, and the loss over twenty steps (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Dimension key: N tokens, D model dim (128), F latents, K active latents.
"""

from __future__ import annotations

import functools

import plotly.graph_objects as go
import torch
from torch import Tensor

from .. import metrics, zoo
from ..data import StoryCorpus
from ..harvest import harvest
from ..sae import TopKConfig, TopKSAE, load_sae
from ..sae.base import auxk_loss as library_auxk_loss
from .checking import CheckFailed, Mistake, call, compare, quietly, register

chapter = register("ch2_topk", "TopK sparse autoencoders")
SITE = "blocks.1.hook_resid_pre"  # where the shipped TopK SAE reads
SAE_NAME = "local_k8"
AUX_COEF = 1 / 32  # Gao et al.'s AuxK coefficient


# ----------------------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=1)
def stories():
    """The checkers' own copy of the shipped stories model (loaded once, quietly)."""
    with quietly():
        return zoo.load_model("stories")


def story_windows(n_stories: int = 40, T: int = 64, seed: int = 1) -> Tensor:
    """Token ids [B, T]: stories the model never saw (it was trained on seed 0), packed end to end into windows."""
    corpus = StoryCorpus(seed=seed)
    stream = torch.tensor([t for ids in corpus.encode(corpus.generate(n_stories)) for t in ids[:-1]])
    return stream[: len(stream) // T * T].view(-1, T)


@functools.lru_cache(maxsize=1)
def activations() -> Tensor:
    """The checkers' own harvest: the residual stream at SITE on 40 held-out stories, [N, 128] (about 3,700 tokens)."""
    with quietly():
        return harvest(stories(), story_windows(), SITE, batch_size=32, progress=False)[SITE]


@functools.lru_cache(maxsize=1)
def shipped_sae() -> TopKSAE:
    """The shipped TopK SAE `local_k8` at SITE (512 latents, k = 8), in eval mode."""
    with quietly():
        return load_sae(zoo.saes("stories")[SAE_NAME]).eval()


def _sae(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor | None, b_dec: Tensor, k: int) -> TopKSAE:
    """A TopKSAE holding these parameters (W_dec: unit rows drawn at random when None)."""
    D, F = W_enc.shape
    sae = TopKSAE(TopKConfig(D, F, k), seed=0)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            if value is not None:
                getattr(sae, name).copy_(value)
    return sae


def _fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


# ----------------------------------------------------------------------------- 2.1 the TopK encoder


def ref_topk_encode(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor, k: int) -> Tensor:
    with torch.no_grad():
        return _sae(W_enc_DF, b_enc_F, None, b_dec_D, k).encode(x_ND)


def _encode(x, W_enc, b_enc, b_dec, k, *, shift=-1.0, bias=True, relu=True, dim=-1, topk=True, dense=True):
    """relu(topk(pre)) scattered back to [N, F], and the knobs its known mistakes turn."""
    pre = (x + shift * b_dec) @ W_enc + (b_enc if bias else 0.0)
    if not topk:
        return pre.relu()
    top = pre.topk(k, dim=dim)
    values = top.values.relu() if relu else top.values
    return torch.zeros_like(pre).scatter(dim, top.indices, values) if dense else values


ENCODE_MISTAKES = [
    Mistake("your TopK keeps negative pre-activations", "apply ReLU after topk: a latent that wins the top-k with a "
            "negative pre-activation must still be 0", lambda *a: _encode(*a, relu=False)),
    Mistake("you forgot to subtract b_dec before encoding", "encode x - b_dec: pre = (x - b_dec) @ W_enc + b_enc "
            "(b_dec centres the data; the decoder adds it back)", lambda *a: _encode(*a, shift=0.0)),
    Mistake("you added b_dec before encoding", "subtract it: pre = (x - b_dec) @ W_enc + b_enc", lambda *a: _encode(*a, shift=1.0)),
    Mistake("your top-k runs over the batch (dim 0): each latent kept its k strongest tokens",
            "take the top k latents of each token: pre.topk(k, dim=-1)", lambda *a: _encode(*a, dim=0)),
    Mistake("you kept every positive pre-activation", "keep only each token's k largest (topk), then ReLU",
            lambda *a: _encode(*a, topk=False)),
    Mistake("you returned the k values [N, K], not the dense latents [N, F]",
            "scatter them back: torch.zeros_like(pre).scatter(-1, top.indices, values)", lambda *a: _encode(*a, dense=False)),
    Mistake("you left out b_enc", "add b_enc after the matmul: pre = (x - b_dec) @ W_enc + b_enc", lambda *a: _encode(*a, bias=False)),
]  # fmt: skip


def _random_params(seed: int, D: int, F: int, enc_shift: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, F, generator=g) / D**0.5, 0.3 * torch.randn(F, generator=g) + enc_shift, torch.randn(D, generator=g)


@chapter.exercise("2.1", "topk_encode", goal="encode activations into TopK latents", difficulty=1, minutes=10)
def check_topk_encode(topk_encode) -> str:
    g = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.randn(6, 8, generator=g) for _ in range(3))
    sae = shipped_sae()
    real = activations()[:200]
    cases = [("6 random tokens, D = 8, F = 16, k = 3", x1, *_random_params(1, 8, 16), 3),
             ("mostly negative pre-activations (b_enc near -1), k = 4", x2, *_random_params(2, 8, 16, enc_shift=-1.0), 4),
             ("k = F = 16: every latent is in the top k", x3, *_random_params(3, 8, 16), 16),
             (f"the shipped SAE {SAE_NAME} on 200 harvested tokens, k = 8", real, sae.W_enc.detach(), sae.b_enc.detach(),
              sae.b_dec.detach(), 8)]  # fmt: skip
    for case, x, W_enc, b_enc, b_dec, k in cases:
        args = (x, W_enc, b_enc, b_dec, k)
        got = call(topk_encode, *(a.clone() if isinstance(a, Tensor) else a for a in args), case=case)
        compare(got, ref_topk_encode(*args), case=case, args=args, mistakes=ENCODE_MISTAKES, atol=1e-5)
    return f"equals TopKSAE.encode on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 2.2 one training step


class WatchedAdam(torch.optim.Adam):
    """Adam that records, at each step(), the gradient it is about to apply and the decoder's row norms."""

    def __init__(self, sae: TopKSAE, lr: float):
        super().__init__(sae.parameters(), lr=lr)
        self.sae, self.steps = sae, []

    def step(self, closure=None):
        grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.sae.named_parameters()}
        self.steps.append({"grads": grads, "rows": self.sae.W_dec.detach().norm(dim=1).clone()})
        return super().step(closure)


NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def _flat(grads: dict[str, Tensor | None], like: dict[str, Tensor]) -> Tensor:
    return torch.cat([(grads[n] if grads[n] is not None else torch.zeros_like(like[n])).reshape(-1) for n in NAMES])


def _fresh(state: dict[str, Tensor], cfg: TopKConfig, x: Tensor, loss: str = "fvu") -> tuple[Tensor, Tensor, float]:
    """The gradient of the loss at `state` on x, flat; the same with W_dec's along-row component removed; the loss."""
    sae = TopKSAE(cfg, seed=0)
    sae.load_state_dict(state)
    x_hat = sae(x).x_hat
    value = _fvu(x_hat, x) if loss == "fvu" else (x_hat - x).pow(2).mean()
    value.backward()
    raw = {n: p.grad.clone() for n, p in sae.named_parameters()}
    W, g = state["W_dec"], raw["W_dec"]
    projected = {**raw, "W_dec": g - (g * W).sum(1, keepdim=True) * W / W.pow(2).sum(1, keepdim=True)}
    return _flat(raw, state), _flat(projected, state), value.item()


def _near(a: Tensor, b: Tensor, rel: float = 0.01) -> bool:
    return a.shape == b.shape and float((a - b).norm()) <= rel * float(b.norm()) + 1e-12


NO_STEP = Mistake("you never called optimizer.step() (on the optimizer passed in)",
                  "after loss.backward(), call optimizer.step(): that is what moves the parameters")
TWO_STEPS = Mistake("you called optimizer.step() more than once", "one train_step is one optimizer.step()")
NO_BACKWARD = Mistake("no gradient had reached the parameters when optimizer.step() ran",
                      "call loss.backward() before optimizer.step(), and optimizer.zero_grad() before the backward, "
                      "not between it and the step")
NO_ZERO_GRAD = Mistake("you forgot optimizer.zero_grad(): gradients accumulate",
                       "each backward adds to .grad, so from the second step on the optimizer applied the sum of this step's "
                       "gradient and the earlier ones; call optimizer.zero_grad() before loss.backward()")  # fmt: skip
MSE_LOSS = Mistake("your loss is the plain MSE", "train on the FVU: sum (x_hat - x)^2 / sum (x - x.mean(0))^2, the MSE "
                   "divided by the variance of the batch, so the loss does not depend on the activations' scale",
                   lambda state, cfg, x: torch.tensor(_fresh(state, cfg, x, loss="mse")[2]))
NO_RENORM = Mistake("decoder rows not renormalised after the step", "after optimizer.step(), divide each row of W_dec by "
                    "its norm, in place without gradient: with torch.no_grad(): sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)")
RENORM_BEFORE = Mistake("you renormalised the decoder rows before optimizer.step(), which moves them off the unit sphere again",
                        "renormalise after the step")
COLUMNS = Mistake("you normalised the columns of W_dec (dim=0)",
                  "each row W_dec[f] is latent f's direction: divide by sae.W_dec.norm(dim=1, keepdim=True)")
NOT_LEARNING = Mistake("your loss did not go down over 20 steps", "let optimizer.step() apply loss.backward()'s gradient "
                       "and change no parameter yourself but W_dec's row norms")  # fmt: skip

TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 20, 128, 2e-3


def fresh_sae(d_sae: int = 256, k: int = 8, seed: int = 0) -> TopKSAE:
    """An untrained TopK SAE for the harvested activations: unit decoder rows, b_dec at the activations' mean."""
    sae = TopKSAE(TopKConfig(activations().shape[1], d_sae, k), seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(activations().mean(0))
    return sae


@chapter.exercise("2.2", "train_step", goal="take one optimisation step of a TopK SAE on a batch of activations",
                  difficulty=2, minutes=15)  # fmt: skip
def check_train_step(train_step) -> str:
    sae = fresh_sae()
    opt = WatchedAdam(sae, lr=TRAIN_LR)
    acts = activations()
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))
    losses, matched_before = [], False
    for step in range(TRAIN_STEPS):
        x = acts[order[step * TRAIN_BATCH:(step + 1) * TRAIN_BATCH]]
        case = f"step {step + 1} of {TRAIN_STEPS} (Adam, lr {TRAIN_LR}, a batch of {TRAIN_BATCH} harvested activations)"
        state = {n: p.detach().clone() for n, p in sae.named_parameters()}
        raw, projected, want_loss = _fresh(state, sae.cfg, x)
        n_steps = len(opt.steps)
        got = call(train_step, sae, opt, x.clone(), case=case)
        if len(opt.steps) == n_steps:
            raise NO_STEP.failed(f"on {case}")
        if len(opt.steps) > n_steps + 1:
            raise TWO_STEPS.failed(f"on {case}: {len(opt.steps) - n_steps} calls")
        compare(got, torch.tensor(want_loss), case=f"{case}, the loss you returned", args=(state, sae.cfg, x), rtol=0.01,
                mistakes=[MSE_LOSS])  # fmt: skip
        seen = opt.steps[-1]
        if all(g is None or not g.any() for g in seen["grads"].values()):
            raise NO_BACKWARD.failed(f"on {case}")
        grad = _flat(seen["grads"], state)
        if not (_near(grad, raw) or _near(grad, projected)):
            excess = grad - raw
            previous = _flat(opt.steps[-2]["grads"], state) if len(opt.steps) > 1 else None
            if matched_before and previous is not None and float(torch.cosine_similarity(excess, previous, dim=0)) > 0.9:
                raise NO_ZERO_GRAD.failed(f"on {case}")
            raise CheckFailed(f"the gradient optimizer.step() applied is not the gradient of the FVU at the parameters "
                              f"before the step, on {case} (relative difference {float(excess.norm() / raw.norm()):.3g})")  # fmt: skip
        matched_before = True
        rows = sae.W_dec.detach().norm(dim=1)
        if not torch.allclose(rows, torch.ones_like(rows), atol=1e-4):
            where = f"on {case}: row norms after the step range {float(rows.min()):.4f}..{float(rows.max()):.4f}"
            cols = sae.W_dec.detach().norm(dim=0)
            if torch.allclose(cols, torch.ones_like(cols), atol=1e-4):
                raise COLUMNS.failed(where)
            if step > 0:  # at step 1 the rows are unit from the init whatever the student does
                at_step = seen["rows"]
                raise (RENORM_BEFORE if torch.allclose(at_step, torch.ones_like(at_step), atol=1e-4) else NO_RENORM).failed(where)
        losses.append(float(torch.as_tensor(got).detach()))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if not last < 0.95 * first:
        raise NOT_LEARNING.failed(f"mean FVU {first:.3f} over the first 3 steps, {last:.3f} over the last 3")
    return f"the FVU's gradient at each step, unit decoder rows after it, FVU {losses[0]:.2f} -> {losses[-1]:.2f} in {TRAIN_STEPS} steps"


# ----------------------------------------------------------------------------- 2.3 dead latents


def ref_dead_fraction(sae: TopKSAE, x_ND: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.tensor(metrics.dead_fraction(metrics.feature_density(sae.encode(x_ND))))


def _per_batch(sae, x, batch_size, what: str):
    with torch.no_grad():
        outs = [sae(b) for b in x.split(batch_size)]
    dead = [(o.latents == 0).all(0) for o in outs]
    if what == "mean":
        return torch.stack([d.float().mean() for d in dead]).mean()
    if what == "last":
        return dead[-1].float().mean()
    if what == "pre":
        return (~torch.stack([(o.pre_acts > 0).any(0) for o in outs]).any(0)).float().mean()
    if what == "mask":
        return torch.stack(dead).all(0)
    raise ValueError(what)


DEAD_MISTAKES = [
    Mistake("you counted per batch instead of over the window: a latent silent in one batch may fire in the next",
            "a latent is dead when it fired on no token of the whole window: OR each batch's firing into one mask [F] "
            "(fired |= (latents > 0).any(0)), and only then count", lambda s, x, b: _per_batch(s, x, b, "mean")),
    Mistake("you kept only the last batch's count", "accumulate which latents fired over every batch of the window",
            lambda s, x, b: _per_batch(s, x, b, "last")),
    Mistake("you used > 0 on the pre-activations", "a latent fires when it is among the k winners: test the latents "
            "after TopK (sae(x).latents > 0), not pre_acts > 0", lambda s, x, b: _per_batch(s, x, b, "pre")),
    Mistake("you returned the fraction of latents that fired", "return the dead ones: 1 - that",
            lambda s, x, b: 1 - ref_dead_fraction(s, x, b)),
    Mistake("you returned the number of dead latents", "divide by the number of latents F",
            lambda s, x, b: ref_dead_fraction(s, x, b) * s.cfg.d_sae),
    Mistake("you returned the dead mask [F]", "return the fraction: mask.float().mean()", lambda s, x, b: _per_batch(s, x, b, "mask")),
]  # fmt: skip


@chapter.exercise("2.3", "dead_fraction", goal="measure the fraction of latents that never fired over a window of tokens",
                  difficulty=1, minutes=10)  # fmt: skip
def check_dead_fraction(dead_fraction) -> str:
    acts = activations()
    untrained = fresh_sae(d_sae=512, k=4, seed=1)
    cases = [(f"the shipped SAE {SAE_NAME} on {len(acts)} harvested tokens, batches of 256", shipped_sae(), acts, 256),
             ("an untrained SAE (512 latents, k = 4) on 1024 tokens, batches of 100", untrained, acts[:1024], 100),
             (f"{SAE_NAME} on 300 tokens in one batch", shipped_sae(), acts[:300], 512)]  # fmt: skip
    for case, sae, x, batch_size in cases:
        before = {n: p.detach().clone() for n, p in sae.named_parameters()}
        got = call(dead_fraction, sae, x.clone(), batch_size, case=case)
        if any(not torch.equal(p, before[n]) for n, p in sae.named_parameters()):
            sae.load_state_dict(before)
            raise CheckFailed(f"your dead_fraction changed the SAE's parameters on {case}: only read them (restored now)")
        compare(got, ref_dead_fraction(sae, x, batch_size), case=case, args=(sae, x, batch_size), mistakes=DEAD_MISTAKES)
    return f"equals metrics.dead_fraction(feature_density(latents)) over the whole window on {len(cases)} inputs"


def dead_by_window_figure(windows=(64, 128, 256, 512, 1024)) -> go.Figure:
    """The shipped SAE's dead fraction when the window is one batch of n tokens (mean over the batches), and over the
    whole harvest, against n: the expected picture of 2.3. Latents that look dead in short windows fire in long ones."""
    sae, acts = shipped_sae(), activations()
    sizes = [n for n in windows if n < len(acts)] + [len(acts)]
    ys = [float(_per_batch(sae, acts[: len(acts) // n * n], n, "mean")) for n in sizes]
    fig = go.Figure(go.Scatter(x=sizes, y=ys, mode="lines+markers", name=SAE_NAME))
    return fig.update_layout(title=f"{SAE_NAME}: fraction of latents that fired on no token of the window", height=320,
                             xaxis=dict(title="window (tokens; the last point is the whole harvest)", type="log"),
                             yaxis_title="dead fraction")


# ----------------------------------------------------------------------------- 2.4 the AuxK loss


def _aux(x, x_hat, pre, dead, W_dec, k_aux, *, target="residual", among="dead", scale=AUX_COEF, norm="fvu", detach=True,
         zero_if_none=True, gather="masked"):  # fmt: skip
    """A dense AuxK and the knobs its known mistakes turn."""
    if zero_if_none and not bool(dead.any()):
        return pre.sum() * 0.0
    masked = pre.masked_fill(~dead, float("-inf")) if among == "dead" else pre
    k = min(k_aux, int(dead.sum())) if gather == "masked" and among == "dead" else k_aux
    top = masked.topk(k, dim=-1) if k > 0 else None
    values = (top.values if gather == "masked" else pre.gather(-1, top.indices)).relu() if top is not None else None
    e_hat = torch.zeros_like(pre).scatter(-1, top.indices, values) @ W_dec if top is not None else torch.zeros_like(x)
    e = x - x_hat
    e = e.detach() if detach else e
    goal = x if target == "x" else e
    if norm == "fvu":
        loss = _fvu(e_hat, goal)
    elif norm == "mse":
        loss = (e_hat - goal).pow(2).mean()
    else:  # divided by sum e^2, uncentred
        loss = (e_hat - goal).pow(2).sum() / goal.pow(2).sum()
    return scale * loss


AUX_MISTAKES = [
    Mistake("your AuxK reconstructs x instead of the residual", "the dead latents should explain what the live ones "
            "missed: the target is e = x - x_hat (detached)", lambda *a: _aux(*a, target="x")),
    Mistake("you picked the top k_aux among all latents, not the dead ones", "mask the live latents out first: "
            "pre.masked_fill(~dead_F, float('-inf')).topk(k_aux)", lambda *a: _aux(*a, among="all")),
    Mistake("you forgot the scale 1/32", "return AUX_COEF * FVU with AUX_COEF = 1/32 (Gao et al.)", lambda *a: _aux(*a, scale=1.0)),
    Mistake("you used the plain MSE", "normalise it: FVU = sum (e_hat - e)^2 / sum (e - e.mean(0))^2",
            lambda *a: _aux(*a, norm="mse")),
    Mistake("you normalised by sum e^2", "normalise by the variance: sum (e - e.mean(0))^2", lambda *a: _aux(*a, norm="uncentred")),
    Mistake("with fewer dead latents than k_aux you took live latents too", "take k = min(k_aux, number of dead latents), "
            "or keep the values of the masked pre-activations (-inf there, 0 after ReLU)", lambda *a: _aux(*a, gather="unmasked")),
    Mistake("with no dead latent your loss is not 0", "AuxK only acts on dead latents: with none, return 0 (a zero tensor)",
            lambda *a: _aux(*a, zero_if_none=False)),
]  # fmt: skip
NOT_DETACHED = Mistake("your residual is not detached: AuxK's gradient also flows into x_hat and so into the live latents",
                       "use e = (x - x_hat).detach(): AuxK must only move the dead latents")
NO_GRAD = Mistake("your loss carries no gradient", "compute it with torch from pre_NF and W_dec_FD (no .item(), no "
                  "torch.no_grad(), no .detach() on them); detach only the residual")


def ref_auxk_loss(sae: TopKSAE, x_ND, x_hat_ND, pre_NF, dead_F, k_aux) -> Tensor:
    if not bool(dead_F.any()):
        return pre_NF.sum() * 0.0
    return AUX_COEF * library_auxk_loss(sae, x_ND, x_hat_ND, pre_NF.detach(), dead_F, k_aux)


def _aux_inputs(state: dict[str, Tensor], x: Tensor) -> tuple[TopKSAE, Tensor, Tensor]:
    """The SAE rebuilt from its state (fresh leaf parameters), and pre [N, F] and x_hat [N, D] computed from them."""
    D, F = state["W_enc"].shape
    sae = TopKSAE(TopKConfig(D, F, int(state["k"])), seed=0)
    sae.load_state_dict({n: v for n, v in state.items() if n != "k"})
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=-1)
    x_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ sae.W_dec + sae.b_dec
    return sae, pre, x_hat


def _aux_run(fn, state: dict[str, Tensor], x, dead, k_aux, *, case: str | None = None, library: bool = False):
    """Call fn on the SAE's pre and x_hat, in the graph of fresh parameters; return (loss, flat gradient or None)."""
    sae, pre, x_hat = _aux_inputs(state, x)
    if library:
        loss = ref_auxk_loss(sae, x, x_hat, pre, dead, k_aux)
    elif case is None:  # a planted mistake
        loss = fn(x, x_hat, pre, dead, sae.W_dec, k_aux)
    else:
        loss = call(fn, x.clone(), x_hat, pre, dead.clone(), sae.W_dec, k_aux, case=case)
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        return loss, None
    loss.backward()
    return loss.detach(), _flat({n: p.grad for n, p in sae.named_parameters()}, dict(sae.named_parameters()))


def _aux_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    D, F, k = 16, 64, 4

    def state(seed):
        W_enc, b_enc, b_dec = _random_params(seed, D, F)
        W_dec = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=-1)
        return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "k": torch.tensor(k)}

    x = torch.randn(48, D, generator=g)
    some = torch.zeros(F, dtype=torch.bool)
    some[torch.randperm(F, generator=g)[:20]] = True
    few = torch.zeros(F, dtype=torch.bool)
    few[[3, 17, 40]] = True
    sae, acts = shipped_sae(), activations()[:256]
    shipped = {**{n: p.detach().clone() for n, p in sae.named_parameters()}, "k": torch.tensor(sae.cfg.k)}
    with torch.no_grad():
        density = (sae(acts).latents > 0).float().mean(0)
    rare = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    rare[density.argsort()[:64]] = True
    return [(f"a random SAE (D = {D}, F = {F}, k = {k}) on 48 tokens, 20 dead latents, k_aux = 8", state(1), x, some, 8),
            ("3 dead latents, k_aux = 8 (fewer dead latents than k_aux)", state(2), x, few, 8),
            ("no dead latent", state(3), x, torch.zeros(F, dtype=torch.bool), 8),
            (f"the shipped SAE {SAE_NAME} on 256 harvested tokens, its 64 rarest latents marked dead, k_aux = 64",
             shipped, acts, rare, 64)]  # fmt: skip


@chapter.exercise("2.4", "auxk_loss", goal="the AuxK loss: dead latents reconstruct the residual", difficulty=3, minutes=20)
def check_auxk_loss(auxk_loss) -> str:
    cases = _aux_cases()
    for case, state, x, dead, k_aux in cases:
        got, got_grad = _aux_run(auxk_loss, state, x, dead, k_aux, case=case)
        want, want_grad = _aux_run(None, state, x, dead, k_aux, library=True)
        with torch.no_grad():
            sae, pre, x_hat = _aux_inputs(state, x)
        args = (x, x_hat, pre, dead, sae.W_dec.detach(), k_aux)
        compare(got, want, case=case, args=args, mistakes=AUX_MISTAKES, rtol=1e-3)
        if not dead.any():  # no dead latent: nothing to train, any zero will do
            continue
        if got_grad is None or not got_grad.any():
            raise NO_GRAD.failed(f"on {case}")
        if not _near(got_grad, want_grad, rel=1e-3):
            _, wrong = _aux_run(lambda *a: _aux(*a, detach=False), state, x, dead, k_aux)
            if wrong is not None and _near(got_grad, wrong, rel=1e-3):
                raise NOT_DETACHED.failed(f"on {case}")
            raise CheckFailed(f"your loss has the right value but not the right gradient on {case} (relative difference "
                              f"{float((got_grad - want_grad).norm() / want_grad.norm()):.3g})")  # fmt: skip
    return f"value and gradient equal 1/32 x sae.base.auxk_loss on {len(cases)} inputs"


__all__ = ["chapter", "check_topk_encode", "check_train_step", "check_dead_fraction", "check_auxk_loss",
           "dead_by_window_figure", "stories", "story_windows", "activations", "shipped_sae", "fresh_sae", "WatchedAdam",
           "SITE", "SAE_NAME", "AUX_COEF", "CheckFailed"]  # fmt: skip
