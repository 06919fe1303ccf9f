"""Chapter 4, end-to-end SAEs and binary autoencoders: checkers for course/masters/04_e2e_bae.py, on the shipped `stories` model.

    KL(P_clean || P_spliced) = mean over tokens of sum_v P_clean(v) (log P_clean(v) - log P_spliced(v))      (Braun et al. 2024)
    e2e loss = that KL with the SAE's x_hat spliced in at `site`, over every position but the first (BOS)
    bits = 1[z > 0] forward;  d bits / dz := s(z) (1 - s(z)) backward        (the shipped BAEs' sigmoid straight-through)
    H(batch) = sum_j Hb(p_j),  p_j = mean_n bits[n, j],  Hb(p) = -p log2 p - (1 - p) log2 (1 - p)   in bits   (Cho et al. 2025)

Each reference is the library's own answer (kl_clean_to_spliced, E2EObjective, binary_step, minibatch_entropy).

Dimension key: B batch, T position, V vocab (587), D model dim (128), F latents or bits (512), N tokens.
"""

from __future__ import annotations

import copy
import functools

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import sites, zoo
from ..data import story_windows
from ..edits import Splice
from ..sae import E2EObjective, TopKConfig, TopKSAE, load_sae
from ..sae.binary import binary_step, feature_set_entropy, minibatch_entropy
from ..sae.e2e import kl_clean_to_spliced
from .checking import CheckFailed, Mistake, call, call_without_leaks, compare, quietly, register

chapter = register("ch4_e2e_bae", "End-to-end SAEs and binary autoencoders")
SITE = "blocks.1.hook_resid_pre"  # where the shipped local, e2e and e2e+ds SAEs live
BAE_SITES = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre",
             "blocks.3.hook_resid_post")  # fmt: skip


# ----------------------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=1)
def stories() -> sites.Model:
    """The checkers' own copy of the shipped stories model (loaded once, quietly)."""
    with quietly():
        return zoo.load_model("stories")


@functools.lru_cache(maxsize=None)
def shipped_sae(run: str) -> torch.nn.Module:
    """A shipped dictionary of the stories model by run name: local_k8, e2e_k4, e2eds_k16, bae_blocks.1.hook_resid_pre ..."""
    with quietly():
        return load_sae(zoo.path("stories") / "saes" / run)


@functools.lru_cache(maxsize=1)
def held_out() -> Tensor:
    """Story windows the model and the SAEs never saw: [16, 64] token ids (seed 1)."""
    return story_windows(seed=1, n_stories=40, n_ctx=64)[:16].clone()


def _logits(model, ids: Tensor, edits=()) -> Tensor:
    with torch.no_grad():
        return sites.run(model, ids, list(edits)).logits


LEFT_HOOK = Mistake("your hook is still registered after your function returned (every later forward pass runs it)",
                    "keep the handle h = module.register_forward_pre_hook(...) and call h.remove() in a finally: block, "
                    "or splice with the library: nbf.run(model, ids, [nbf.Splice(site, sae)])")  # fmt: skip


# ----------------------------------------------------------------------------- 4.1 the KL objective


def ref_kl_clean_to_spliced(logits_clean_BTV: Tensor, logits_spliced_BTV: Tensor) -> Tensor:
    return kl_clean_to_spliced(logits_clean_BTV, logits_spliced_BTV)


def _kl_per_token(c: Tensor, s: Tensor) -> Tensor:
    lp, lq = c.float().log_softmax(-1), s.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _naive_kl(c: Tensor, s: Tensor) -> Tensor:  # log of softmax: a probability that underflows to 0 gives log 0 = -inf
    p, q = c.float().softmax(-1), s.float().softmax(-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


KL_MISTAKES = [
    Mistake("the KL is reversed: you computed KL(P_spliced || P_clean)",
            "the paper (and the library) uses KL(P_clean || P_spliced): the clean model's distribution is the target, "
            "so weight by P_clean: sum_v P_clean (log P_clean - log P_spliced)",
            lambda c, s: kl_clean_to_spliced(s, c)),
    Mistake("your KL is negative: you subtracted the log-probabilities the wrong way round",
            "sum_v P_clean (log P_clean - log P_spliced)", lambda c, s: -kl_clean_to_spliced(c, s)),
    Mistake("you used logits where log-probabilities belong", "logits are not log-probabilities: apply log_softmax(-1) "
            "to both before subtracting", lambda c, s: (c.float().softmax(-1) * (c.float() - s.float())).sum(-1).mean()),
    Mistake("you passed raw logits to F.kl_div", "F.kl_div(input, target) expects input = log-probabilities of the "
            "spliced model: pass logits_spliced.log_softmax(-1)",
            lambda c, s: F.kl_div(s.float(), c.float().softmax(-1), reduction="none").sum(-1).mean()),
    Mistake("you did not weight the log-ratio by P_clean", "KL = sum_v P_clean(v) (log P_clean(v) - log P_spliced(v)): "
            "multiply by P_clean = log_p_clean.exp() before summing over the vocabulary",
            lambda c, s: (c.float().log_softmax(-1) - s.float().log_softmax(-1)).sum(-1).mean()),
    Mistake("you summed the KL over positions", "average it over tokens (every batch row and position): .mean() of "
            "the per-token KL", lambda c, s: _kl_per_token(c, s).sum()),
    Mistake("you divided by the batch size only (F.kl_div's reduction='batchmean' on [B, T, V] sums over positions)",
            "average over every token: sum over the vocabulary, then .mean() over batch and position (or flatten to "
            "[B*T, V] before reduction='batchmean')", lambda c, s: _kl_per_token(c, s).sum() / c.shape[0]),
    Mistake("you averaged over the vocabulary too (F.kl_div's reduction='mean' averages every element)",
            "sum over the vocabulary, average over tokens only", lambda c, s: _kl_per_token(c, s).mean() / c.shape[-1]),
    Mistake("you took the log of a softmax, which underflows: a probability of 0 gives log 0 = -inf and 0 * -inf = NaN",
            "use log_softmax(-1), which stays finite on large logits", _naive_kl),
    Mistake("you returned one KL per token", "average the per-token KL over tokens: one number",
            lambda c, s: _kl_per_token(c, s)),
]  # fmt: skip
KL_NO_GRAD = Mistake("your KL carries no gradient to the spliced logits (computed under no_grad, detached, or turned "
                     "into a Python number)", "the KL is a training loss: compute it with torch operations on the "
                     "tensors you were given and return the tensor")  # fmt: skip


def _spliced_example() -> tuple[Tensor, Tensor]:
    """Clean and spliced logits [1, T, V] of the stories model on a story, the shipped local_k8 SAE at blocks.1."""
    ids = held_out()[:1, :12]
    return _logits(stories(), ids), _logits(stories(), ids, [Splice(SITE, shipped_sae("local_k8"))])


@chapter.exercise("4.1", "kl_clean_to_spliced", goal="the e2e objective: KL(P_clean || P_spliced) averaged over tokens",
                  difficulty=2, minutes=15)  # fmt: skip
def check_kl_clean_to_spliced(kl_clean_to_spliced) -> str:
    g = torch.Generator().manual_seed(0)
    c1, s1 = torch.randn(2, 2, 5, 11, generator=g)
    c3, s3 = 40 * torch.randn(2, 1, 3, 7, generator=g)
    s3[0, 0, c3[0, 0].argmax()] = -300.0  # the clean model's favourite token is all but impossible after splicing
    cm, sm = _spliced_example()
    cases = [("random logits [2, 5, 11]", c1, s1), ("the stories model clean vs spliced (local_k8 at blocks.1), [1, 12, 587]", cm, sm),
             ("large logits (40 N(0, 1)), [1, 3, 7]", c3, s3), ("identical logits (KL = 0), [2, 5, 11]", c1, c1.clone())]  # fmt: skip
    for case, c, s in cases:
        got = call(kl_clean_to_spliced, c.clone(), s.clone(), case=case)
        compare(got, ref_kl_clean_to_spliced(c, s), case=case, args=(c, s), mistakes=KL_MISTAKES)
    case = "random logits [2, 5, 11], logits_spliced requiring grad"
    s = s1.clone().requires_grad_(True)
    got = call(kl_clean_to_spliced, c1.clone(), s, case=case)
    if not isinstance(got, Tensor) or not got.requires_grad:
        raise KL_NO_GRAD.failed(f"on {case}: your output is {type(got).__name__}" + (" without grad_fn" if isinstance(got, Tensor) else ""))
    return f"equals kl_clean_to_spliced on {len(cases)} inputs, and carries a gradient"


# ----------------------------------------------------------------------------- 4.2 the e2e loss through the spliced model


def ref_e2e_loss(model, sae, ids_BT: Tensor, site: str) -> Tensor:
    with quietly():  # E2EObjective freezes the model's parameters (they are not trained), as the student's run may
        return E2EObjective(model, sae, site, "e2e")(ids_BT)[0]


def _e2e(model, sae, ids, site, *, splice_at=None, reverse=False, skip_first=True) -> Tensor:
    clean = _logits(model, ids)
    spliced = sites.run(model, ids, [Splice(splice_at or site, sae)]).logits
    if skip_first:
        clean, spliced = clean[:, 1:], spliced[:, 1:]
    return kl_clean_to_spliced(spliced, clean) if reverse else kl_clean_to_spliced(clean, spliced)


def _block_output(site: str) -> str:  # blocks.L.hook_resid_pre -> blocks.L.hook_resid_post: a forward hook on block L
    return site.replace("hook_resid_pre", "hook_resid_post")


E2E_MISTAKES = [
    Mistake("you included the first position (BOS)", "the library leaves it out (E2EObjective(mask_first=True)): its "
            "activation norm dwarfs the rest; average the KL over positions 1: only (logits[:, 1:])",
            lambda m, sae, ids, site: _e2e(m, sae, ids, site, skip_first=False)),
    Mistake("the KL is reversed: you computed KL(P_spliced || P_clean)", "the paper uses KL(P_clean || P_spliced): "
            "the clean model's distribution is the target", lambda m, sae, ids, site: _e2e(m, sae, ids, site, reverse=True)),
    Mistake("you replaced the block's output: a forward hook on transformer.h[L] edits blocks.L.hook_resid_post",
            "blocks.L.hook_resid_pre is block L's input: use register_forward_pre_hook, or nbf.Splice(site, sae)",
            lambda m, sae, ids, site: _e2e(m, sae, ids, site, splice_at=_block_output(site))),
    Mistake("your clean and spliced runs are the same model (the KL is 0)", "run the model once without the SAE (clean) "
            "and once with x_hat in place of the activation at the site (spliced)",
            lambda m, sae, ids, site: torch.zeros(())),
]  # fmt: skip
E2E_NO_GRAD = Mistake("no gradient reaches the SAE's parameters", "run the spliced model with gradients on (not under "
                      "torch.no_grad) and do not detach x_hat; only the clean run needs no gradient")  # fmt: skip


@chapter.exercise("4.2", "e2e_loss", goal="the e2e loss: splice the SAE into the model and measure the KL it costs",
                  difficulty=2, minutes=20)  # fmt: skip
def check_e2e_loss(e2e_loss) -> str:
    m = stories()
    fresh = TopKSAE(TopKConfig(d_in=128, d_sae=256, k=4), seed=3)
    ids_rand = torch.randint(1, 587, (2, 9), generator=torch.Generator().manual_seed(5))
    ids_rand[:, 0] = 0  # BOS
    cases = [("the shipped local_k8 SAE at blocks.1.hook_resid_pre, 2 stories of 16 tokens", shipped_sae("local_k8"),
              held_out()[:2, :16], SITE),
             ("the shipped e2e_k4 SAE at blocks.1.hook_resid_pre, 3 stories of 10 tokens", shipped_sae("e2e_k4"),
              held_out()[2:5, :10], SITE),
             ("an untrained TopK SAE (k = 4) at blocks.2.hook_resid_pre, 2 random sequences of 9 tokens", fresh, ids_rand,
              "blocks.2.hook_resid_pre")]  # fmt: skip
    for case, sae, ids, site in cases:
        ref_sae, my_sae = copy.deepcopy(sae).requires_grad_(True), copy.deepcopy(sae).requires_grad_(True)
        want = ref_e2e_loss(m, ref_sae, ids, site)
        want.backward()
        got = call_without_leaks(m, e2e_loss, my_sae, ids.clone(), site, case=case, left_hook=LEFT_HOOK)
        compare(got, want, case=case, args=(m, sae, ids, site), mistakes=E2E_MISTAKES)
        if not isinstance(got, Tensor) or not got.requires_grad:
            raise E2E_NO_GRAD.failed(f"on {case}: your loss has no grad_fn")
        got.backward()
        if my_sae.W_dec.grad is None:
            raise E2E_NO_GRAD.failed(f"on {case}: sae.W_dec.grad is None after loss.backward()")
        compare(my_sae.W_dec.grad, ref_sae.W_dec.grad, case=f"{case}: the gradient of W_dec", atol=1e-6, rtol=1e-3)
    return f"equals E2EObjective(model, sae, site, 'e2e') in value and gradient on {len(cases)} inputs"


def kl_figure(runs=("local", "e2e", "e2eds"), ks=(4, 8, 16)) -> go.Figure:
    """What splicing each shipped SAE costs the model at blocks.1.hook_resid_pre: the expected picture of 4.2."""
    m, ids = stories(), held_out()
    clean = _logits(m, ids)[:, 1:]
    names = {"local": "local (MSE)", "e2e": "e2e (KL)", "e2eds": "e2e+ds (KL + downstream MSE)"}
    kl = {r: [float(kl_clean_to_spliced(clean, _logits(m, ids, [Splice(SITE, shipped_sae(f"{r}_k{k}"))])[:, 1:])) for k in ks]
          for r in runs}  # fmt: skip
    fig = go.Figure([go.Bar(x=[f"k = {k}" for k in ks], y=kl[r], name=names[r]) for r in runs])
    return fig.update_layout(title="KL(P_clean || P_spliced) of the shipped TopK SAEs at blocks.1.hook_resid_pre, 16 held-out stories",
                             yaxis_title="KL (nats per token)", barmode="group", height=340)  # fmt: skip


# ----------------------------------------------------------------------------- 4.3 the 1-bit estimator


def ref_binary_step(z: Tensor) -> Tensor:
    return binary_step(z, "sigmoid_ste")


def ref_step_grad(z: Tensor, g: Tensor) -> Tensor:
    """d loss / dz through the reference step, for the upstream gradient g."""
    z = z.detach().clone().requires_grad_(True)
    ref_binary_step(z).backward(g)
    return z.grad


STEP_MISTAKES = [
    Mistake("you thresholded with sign(z): bits are 0 or 1, not -1 and +1", "use (z > 0) as a float: 1 where z > 0, "
            "else 0", lambda z: torch.sign(z)),
    Mistake("you thresholded sigmoid(z) at 0, and a sigmoid is always positive: every bit is on",
            "threshold z at 0 (equivalently sigmoid(z) at 0.5)", lambda z: torch.ones_like(z)),
    Mistake("your bits are not binary: you returned sigmoid(z)", "the forward pass is the step 1[z > 0]; sigmoid only "
            "shapes the backward pass", lambda z: torch.sigmoid(z)),
    Mistake("a pre-activation of exactly 0 turned its bit on", "the bit is 1[z > 0], strictly greater: z = 0 is off",
            lambda z: (z >= 0).float()),
]  # fmt: skip
STEP_GRAD_MISTAKES = [
    Mistake("you passed the gradient straight through unchanged (the plain straight-through estimator)",
            "the shipped BAEs scale it by the sigmoid's slope at the pre-activation: grad_z = grad_out * s(z) (1 - s(z))",
            lambda z, g: g.clone()),
    Mistake("you scaled the gradient by sigmoid(z), not by its derivative", "grad_z = grad_out * s(z) (1 - s(z))",
            lambda z, g: g * torch.sigmoid(z)),
    Mistake("you applied the sigmoid-derivative form to the incoming gradient, g (1 - g), as the BAE reference code does",
            "evaluate it at the pre-activation instead: grad_z = g * s(z) (1 - s(z))", lambda z, g: g * (1 - g)),
    Mistake("your step has no gradient (zero everywhere)", "a step's true gradient is 0: let a surrogate carry it, e.g. "
            "hard + soft - soft.detach() with soft = sigmoid(z)", lambda z, g: torch.zeros_like(z)),
]  # fmt: skip
STEP_NO_GRAD = Mistake("no gradient flows through your step: (z > 0).float() is a constant to autograd",
                       "add a straight-through surrogate: hard + soft - soft.detach(), soft = torch.sigmoid(z) (its "
                       "value is hard, its gradient soft's), or write a torch.autograd.Function")  # fmt: skip


def _bae_preacts() -> Tensor:
    """Pre-activations [32, 512] of the shipped BAE at blocks.1.hook_resid_pre on 2 held-out stories of 16 tokens."""
    bae = shipped_sae(f"bae_{SITE}")
    with torch.no_grad():
        x = sites.read_acts(stories(), held_out()[:2, :16], SITE)[SITE].reshape(-1, bae.cfg.d_in)
        return x @ bae.W_enc + bae.b_enc


@chapter.exercise("4.3", "binary_step", goal="the 1-bit estimator: a step forward, a sigmoid straight-through gradient backward",
                  difficulty=3, minutes=20)  # fmt: skip
def check_binary_step(binary_step) -> str:
    g = torch.Generator().manual_seed(1)
    z_edge = torch.tensor([[-30.0, -1.0, 0.0, 0.5], [30.0, 0.0, -0.25, 2.0]])
    cases = [("random z [4, 16]", torch.randn(4, 16, generator=g)), ("z with exact zeros and large values [2, 4]", z_edge),
             ("the shipped BAE's pre-activations on 32 tokens [32, 512]", _bae_preacts())]  # fmt: skip
    for case, z in cases:
        zz = z.clone().requires_grad_(True)
        got = call(binary_step, zz, case=case)
        compare(got, ref_binary_step(z), case=case, args=(z,), mistakes=STEP_MISTAKES)
        if not isinstance(got, Tensor) or not got.requires_grad:
            raise STEP_NO_GRAD.failed(f"on {case}: your output has no grad_fn")
        up = torch.randn(z.shape, generator=g)
        got.backward(up)
        if zz.grad is None:
            raise STEP_NO_GRAD.failed(f"on {case}: z.grad is None after backward")
        compare(zz.grad, ref_step_grad(z, up), case=f"{case}: the gradient for a random upstream gradient", args=(z, up),
                mistakes=STEP_GRAD_MISTAKES)  # fmt: skip
    return f"1[z > 0] forward and grad * s(z)(1 - s(z)) backward on {len(cases)} inputs"


def step_figure(lo: float = -6.0, hi: float = 6.0, n: int = 121) -> go.Figure:
    """The step and the gradient each estimator passes back for an upstream gradient of 1: the expected picture of 4.3."""
    z = torch.linspace(lo, hi, n)
    grads = {}
    for est in ("sigmoid_ste", "ste"):
        zz = z.clone().requires_grad_(True)
        binary_step(zz, est).backward(torch.ones(n))
        grads[est] = zz.grad.tolist()
    fig = go.Figure([go.Scatter(x=z.tolist(), y=binary_step(z, "sigmoid_ste").tolist(), name="forward: 1[z > 0]", line_shape="hv"),
                     go.Scatter(x=z.tolist(), y=grads["sigmoid_ste"], name="backward: s(z)(1 - s(z))  (sigmoid_ste, the shipped BAEs)"),
                     go.Scatter(x=z.tolist(), y=grads["ste"], name="backward: 1  (plain straight-through)", line_dash="dot")])  # fmt: skip
    return fig.update_layout(title="The binary step and the gradient it passes back (upstream gradient 1)", xaxis_title="pre-activation z",
                             height=320)  # fmt: skip


# ----------------------------------------------------------------------------- 4.4 the minibatch (feature-set) entropy


def ref_minibatch_entropy(bits_NF: Tensor) -> Tensor:
    return minibatch_entropy(bits_NF)


def _hb(p: Tensor, log=torch.log2, eps: float = 1e-10) -> Tensor:
    return -(p * log(p + eps) + (1 - p) * log(1 - p + eps))


ENTROPY_MISTAKES = [
    Mistake("0 log 0 gave NaN: a bit that never (or always) fires has p = 0 (or 1)",
            "add a small eps inside the logs, as the library does (log2(p + 1e-10), log2(1 - p + 1e-10))",
            lambda b: _hb(b.float().mean(0), eps=0.0).sum()),
    Mistake("you used the natural log: that is the entropy in nats", "the BAE counts bits: torch.log2 (or divide by ln 2)",
            lambda b: _hb(b.float().mean(0), log=torch.log).sum()),
    Mistake("you took the entropy of the counts, not of the firing rates", "p_j = bits[:, j].mean(): divide each "
            "bit's count by the batch size N", lambda b: _hb(b.float().sum(0)).sum()),
    Mistake("you took the entropy of one distribution over the bits (counts / total)", "each bit is its own Bernoulli "
            "variable: sum the binary entropies Hb(p_j) of the per-bit firing rates",
            lambda b: -(lambda p: (p * torch.log2(p + 1e-10)).sum())(b.float().sum(0) / b.float().sum().clamp_min(1))),
    Mistake("you averaged the bits' entropies", "the library sums them: the entropy of the whole code, in bits",
            lambda b: _hb(b.float().mean(0)).mean()),
    Mistake("your firing rates are per token (a mean over dim 1)", "bit j's firing rate is over the minibatch: "
            "p = bits.mean(0), one rate per bit [F]", lambda b: _hb(b.float().mean(1)).sum()),
    Mistake("you took the entropy of each activation (a 0 or 1 has entropy 0), not of each bit's firing rate",
            "first average each bit over the minibatch (p = bits.mean(0)), then take Hb(p)", lambda b: _hb(b.float()).sum()),
    Mistake("you left out the (1 - p) log2 (1 - p) term", "a bit is a Bernoulli variable: Hb(p) = -p log2 p - (1 - p) log2 (1 - p)",
            lambda b: -(lambda p: p * torch.log2(p + 1e-10))(b.float().mean(0)).sum()),
    Mistake("you returned one entropy per bit", "sum them: one number, the entropy of the code", lambda b: _hb(b.float().mean(0))),
]  # fmt: skip
ENTROPY_NO_GRAD = Mistake("your entropy carries no gradient", "the BAE's loss adds it as a penalty: compute it with "
                          "torch operations on the bits and return the tensor (no .item(), no numpy)")  # fmt: skip


def _bae_bits() -> Tensor:
    """Bits [32, 512] of the shipped BAE at blocks.1.hook_resid_pre on 2 held-out stories, carrying a gradient to its encoder."""
    bae = copy.deepcopy(shipped_sae(f"bae_{SITE}")).requires_grad_(True)
    with torch.no_grad():
        x = sites.read_acts(stories(), held_out()[:2, :16], SITE)[SITE].reshape(-1, bae.cfg.d_in)
    return bae(x).latents


@chapter.exercise("4.4", "minibatch_entropy", goal="the BAE's entropy: the summed binary entropy of each bit's firing rate, in bits",
                  difficulty=1, minutes=10)  # fmt: skip
def check_minibatch_entropy(minibatch_entropy) -> str:
    g = torch.Generator().manual_seed(2)
    mixed = (torch.rand(64, 16, generator=g) < torch.linspace(0.05, 0.95, 16)).float()
    mixed[0], mixed[1] = 1.0, 0.0  # every bit fires on some tokens and not on others
    dead = (torch.rand(32, 8, generator=g) < 0.4).float()
    dead[:, 2], dead[:, 5] = 0.0, 1.0  # bit 2 never fires, bit 5 always does
    bits = _bae_bits()
    cases = [("random bits [64, 16], every bit sometimes on and sometimes off", mixed),
             ("bits [32, 8] with a bit never on and a bit always on", dead),
             ("the shipped BAE's bits on 32 tokens [32, 512]", bits), ("a single token [1, 8]", dead[:1])]  # fmt: skip
    for case, b in cases:
        got = call(minibatch_entropy, b if b.requires_grad else b.clone(), case=case)
        compare(got, ref_minibatch_entropy(b), case=case, args=(b.detach(),), mistakes=ENTROPY_MISTAKES, atol=1e-4)
        if b.requires_grad and (not isinstance(got, Tensor) or not got.requires_grad):
            raise ENTROPY_NO_GRAD.failed(f"on {case} (bits carrying a gradient to the BAE's encoder)")
    return f"equals minibatch_entropy on {len(cases)} inputs, with its gradient"


def entropy_figure() -> go.Figure:
    """Feature-set entropy of 16 held-out stories at each depth, by the shipped BAEs: the expected picture of 4.4."""
    ids = held_out()
    acts = sites.read_acts(stories(), ids, list(BAE_SITES))
    h = [feature_set_entropy(shipped_sae(f"bae_{s}"), acts[s][:, 1:]) for s in BAE_SITES]
    fig = go.Figure(go.Scatter(x=list(BAE_SITES), y=h, mode="lines+markers"))
    return fig.update_layout(title="Feature-set entropy of 16 held-out stories (63 tokens each) by depth, shipped BAEs (512 bits)",
                             yaxis_title="entropy (bits)", height=320)  # fmt: skip


__all__ = ["chapter", "check_kl_clean_to_spliced", "check_e2e_loss", "check_binary_step", "check_minibatch_entropy",
           "kl_figure", "step_figure", "entropy_figure", "stories", "shipped_sae", "held_out", "SITE", "BAE_SITES",
           "CheckFailed"]  # fmt: skip
