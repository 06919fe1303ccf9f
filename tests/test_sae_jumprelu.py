"""JumpReLU SAE: every loss form and every gradient (the straight-through threshold gradient written by hand) against
the dense obvious version on both training paths, SAELens's own training code as the oracle of the sparsity and
pre-activation losses, files both ways, planted directions recovered; and, for the whole JumpReLU family (JumpReLU,
BatchTopK, Matryoshka: each a JumpReLU at inference), a splice into a shipped model against a raw torch hook,
evaluate_sae and summarize_features."""

import copy

import pytest
import torch

from nbfeatures import sites, zoo
from nbfeatures.edits import Splice
from nbfeatures.evals import evaluate_sae
from nbfeatures.features import summarize_features
from nbfeatures.sae import (BatchTopKConfig, BatchTopKSAE, JumpReLUConfig, JumpReLUObjective, JumpReLUSAE, MatryoshkaConfig,
                            MatryoshkaSAE, load_sae, save_sae)
from nbfeatures.sae import blocked
from nbfeatures.sae.blocked import BLOCK_SIZE
from nbfeatures.train import TrainConfig, train_sae
from nbfeatures import metrics
from nbfeatures.evals import planted_directions
from sae_support import grads, reloads_exactly

pytestmark = pytest.mark.usefixtures("one_thread")


def make(level=1.6, d_in=8, d_sae=16, seed=0, dtype=torch.float64, **cfg):
    """Thresholds spread around `level` (high: few entries near them, the sparse path; low: the dense path)."""
    cfg = {"bandwidth": 0.5, "l0_coef": 0.3, **cfg}
    sae = JumpReLUSAE(JumpReLUConfig(d_in, d_sae, **cfg), seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.W_enc.add_(0.05 * torch.randn(d_in, d_sae, generator=g))
        sae.W_dec.mul_(1 + 0.2 * torch.rand(d_sae, 1, generator=g))  # off unit norm: the |W_dec| factors matter
        sae.threshold.copy_(level * (0.5 + torch.rand(d_sae, generator=g)).to(torch.float32))  # float32 values: SAELens's
    return sae


def rect(z):
    return (z.abs() < 0.5).to(z.dtype)


def ste_jumprelu(pre, t, eps):
    """pre H(pre - t), plus a term worth 0 whose t-derivative is the estimator -(t / eps) rect((pre - t) / eps)."""
    t0 = t.detach()
    return pre * (pre > t).to(pre.dtype) + (t0 / eps * rect((pre - t0) / eps)).detach() * (t0 - t)


def ste_step(pre, t, eps):
    """H(pre - t), plus a term worth 0 whose t-derivative is -(1 / eps) rect((pre - t) / eps); none for pre."""
    t0 = t.detach()
    return (pre > t).to(pre.dtype) + (rect((pre - t0) / eps) / eps).detach() * (t0 - t)


def reference_terms(sae, x, dead, pre_act_coef):
    c = sae.cfg
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = ste_jumprelu(pre, sae.threshold, c.bandwidth)
    x_hat = acts @ sae.W_dec + sae.b_dec
    terms = {"fvu": (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()}
    norms = sae.W_dec.norm(dim=1)
    l0 = ste_step(pre, sae.threshold, c.bandwidth).sum(-1)
    per_token = {"step": l0, "quadratic": 2 / (c.target_l0 or 1) * (l0 - (c.target_l0 or 0)) ** 2,
                 "tanh": torch.tanh(c.tanh_scale * acts * norms).sum(-1)}[c.sparsity_loss]
    terms["sparsity"] = c.l0_coef * per_token.mean()
    if pre_act_coef:
        terms["pre_act"] = pre_act_coef * ((sae.threshold - pre).relu() * dead * norms).sum(-1).mean()
    return terms


LOSSES = [dict(sparsity_loss="step"), dict(sparsity_loss="tanh"), dict(sparsity_loss="quadratic", target_l0=2.0)]


# block: the reference path through the [N, F] pre (None), one tile (the default), tiles of 5 latents x 4 tokens
@pytest.mark.parametrize("block", [None, BLOCK_SIZE, 5])
@pytest.mark.parametrize("path, level", [("sparse", 1.6), ("dense", 0.1)])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda d: d["sparsity_loss"])
def test_objective_loss_and_every_gradient_match_the_hand_written_reference(loss, path, level, block, monkeypatch):
    monkeypatch.setattr(blocked, "_TILE", 20)
    sae = make(level, **loss)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (sae.encode_train(x, block_size=block).idx is None) == (path == "dense")
    obj = JumpReLUObjective(sae, pre_act_coef=0.7, dead_tokens=1, block_size=block)
    obj.firing.tokens_since_fired[:] = 5  # every latent dead but those that fire in this batch
    loss_value, logs = obj(x)
    torch.autograd.backward(loss_value)
    fast = grads(sae)
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    dead = ~(pre > sae.threshold).any(0)
    terms = reference_terms(sae, x, dead, 0.7)
    torch.autograd.backward(sum(terms.values()))
    assert dead.any() and not dead.all() and set(logs) >= set(terms) | {"l0", "dead_fraction", "loss"}
    for name, t in terms.items():
        assert logs[name] == pytest.approx(t.item(), rel=1e-9, abs=1e-12), name
    torch.testing.assert_close(loss_value, sum(terms.values()), atol=1e-6, rtol=1e-6)
    ref = grads(sae)
    assert ref["threshold"].abs().max() > 0  # entries fall within the kernel: the estimator is exercised
    for name, g in ref.items():
        torch.testing.assert_close(fast[name], g, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("block, tile", [(50, 1 << 24), (7, 28), (16, 16)])
def test_blocked_above_finds_every_entry_above_the_floor_in_order(block, tile, monkeypatch):
    monkeypatch.setattr(blocked, "_TILE", tile)
    g = torch.Generator().manual_seed(6)
    x, W, b = torch.randn(20, 6, generator=g), torch.randn(6, 50, generator=g), torch.randn(50, generator=g)
    floor = 2.0 + torch.rand(50, generator=g)
    pre = torch.addmm(b, x, W)
    rows, cols = (pre > floor).nonzero(as_tuple=True)
    want_vals, want_idx, want_valid = blocked.pack_rows(rows, cols, pre[rows, cols], 20)
    vals, idx, valid = blocked.blocked_above(x, W, b, floor, block)
    assert torch.equal(valid, want_valid) and torch.equal(idx[valid], want_idx[valid]) and want_valid.sum(1).min() < idx.shape[1]
    torch.testing.assert_close(vals, want_vals, atol=1e-5, rtol=1e-5)  # 0 at padding
    assert blocked.blocked_above(x, W, b, floor - 10.0, block) is None  # most entries qualify: the caller goes dense


@pytest.mark.parametrize("name", ["jumprelu", "batchtopk", "matryoshka"])
def test_bfloat16_training_steps_agree_with_float32(name):
    """The sparse kernels' half-precision backward (sampled_addmm has no bf16 CPU kernel: it runs in float32)."""
    torch.manual_seed(0)
    sae = {"jumprelu": lambda: make(1.6, d_sae=32, dtype=torch.float32),
           "batchtopk": lambda: BatchTopKSAE(BatchTopKConfig(8, 32, 3)),
           "matryoshka": lambda: MatryoshkaSAE(MatryoshkaConfig(8, 32, 3))}[name]()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        s = copy.deepcopy(sae).to(dtype)
        loss, _ = s.default_objective()(x.to(dtype))
        torch.autograd.backward(loss)
        got[dtype] = {n: p.grad.float() for n, p in s.named_parameters() if p.grad is not None}
    assert set(got[torch.float32]) == set(got[torch.bfloat16]) >= {"W_enc", "W_dec"}
    for n, g in got[torch.float32].items():  # bf16 keeps 8 bits; the threshold's estimator counts the entries in a
        if n != "threshold":  # window of width eps, and bf16 rounding moves a few across its edges: not comparable
            assert (got[torch.bfloat16][n] - g).norm() <= 0.1 * g.norm() + 1e-4, n


def test_blocked_above_an_empty_batch_is_empty():
    vals, idx, valid = blocked.blocked_above(torch.zeros(0, 6), torch.randn(6, 50), torch.zeros(50), torch.zeros(50), 16)
    assert vals.shape == idx.shape == valid.shape == (0, 1)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda d: d["sparsity_loss"])
def test_sparsity_and_pre_act_losses_match_saelens_training_code(loss):
    jumprelu_sae = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    from sae_lens.saes.sae import TrainStepInput

    ours = make(1.0, dtype=torch.float32, **loss)
    cfg = jumprelu_sae.JumpReLUTrainingSAEConfig(
        d_in=8, d_sae=16, jumprelu_bandwidth=0.5, jumprelu_sparsity_loss_mode=loss["sparsity_loss"], l0_coefficient=0.3,
        target_l0=loss.get("target_l0"), jumprelu_tanh_scale=4.0, pre_act_loss_coefficient=0.7)  # fmt: skip
    theirs = jumprelu_sae.JumpReLUTrainingSAE(cfg)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    obj = JumpReLUObjective(ours, pre_act_coef=0.7, dead_tokens=1)
    obj.firing.tokens_since_fired[:] = 5
    terms, _ = obj.losses(x)
    dead = obj.firing.tokens_since_fired >= 1
    feature_acts, hidden_pre = theirs.encode_with_hidden_pre(x)
    step = TrainStepInput(sae_in=x, coefficients={"l0": 0.3}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    their_terms = theirs.calculate_aux_loss(step, feature_acts, hidden_pre, theirs.decode(feature_acts))
    for ours_name, their_name in (("sparsity", "l0_loss"), ("pre_act", "pre_act_loss")):
        ours.zero_grad(), theirs.zero_grad()
        torch.testing.assert_close(terms[ours_name], their_terms[their_name], atol=1e-5, rtol=1e-5)
        torch.autograd.backward(terms[ours_name], retain_graph=True)
        torch.autograd.backward(their_terms[their_name], retain_graph=True)
        for name, p in theirs.named_parameters():
            mine, their = dict(ours.named_parameters())[name].grad, p.grad  # None: no gradient reaches it
            zero = torch.zeros_like(p)
            torch.testing.assert_close(zero if mine is None else mine, zero if their is None else their, atol=1e-5, rtol=1e-5,
                                       msg=f"{ours_name}: {name}")  # fmt: skip


def test_inference_is_saelens_jumprelu_and_forward_is_decode_of_encode():
    sae = make(0.5, dtype=torch.float32)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = sae(x)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(out.latents, torch.relu(pre) * (pre > sae.threshold), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat)
        assert out.x_hat.shape == (2, 5, 8) and out.latents.shape == (2, 5, 16) and out.pre_acts.shape == (2, 5, 16)


def test_a_step_keeps_thresholds_non_negative_and_moves_them():
    sae = JumpReLUSAE(JumpReLUConfig(8, 16, bandwidth=0.2, l0_coef=0.5, init_threshold=0.05))
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    train_sae(sae, x, TrainConfig(steps=20, batch_size=64, lr=0.02), progress=False)
    assert (sae.threshold >= 0).all() and sae.threshold.max() > 0.2  # the L0 penalty pushed them up
    with torch.no_grad():
        sae.threshold[0] = -1.0
    sae.after_step_()
    assert sae.threshold[0] == 0


def test_save_load_is_bit_exact_and_saelens_loads_its_jumprelu(tmp_path):
    sae = make(0.5, dtype=torch.float32, sparsity_loss="quadratic", target_l0=3.0)
    back, theirs = reloads_exactly(sae, save_sae(sae, tmp_path / "jr"), 2 * torch.randn(20, 8))
    assert back.metadata["training_architecture"] == "jumprelu" and type(theirs).__name__ == "JumpReLUSAE"


def test_a_jumprelu_saelens_trained_stays_inference_only(tmp_path):
    """SAELens's training details name its own settings (jumprelu_bandwidth ...), not ours: its inference class here."""
    jumprelu_sae = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    theirs = jumprelu_sae.JumpReLUTrainingSAE(jumprelu_sae.JumpReLUTrainingSAEConfig(d_in=8, d_sae=16))
    theirs.save_inference_model(str(tmp_path))
    assert type(load_sae(tmp_path)).__name__ == "SAELensSAE"


def test_planted_directions_are_recovered():
    """300 steps on three seeds (worst seen: best cosine 0.92, L0 3.8, FVU 0.09); thresholds below the worst. The
    bandwidth is a few percent of these activations (~1), as the paper's 0.001 is of its normalised ones."""
    for seed in range(3):
        x, _, dirs = planted_directions(8192, 24, 32, 3 / 32, seed=seed)
        sae = JumpReLUSAE(JumpReLUConfig(24, 64, l0_coef=3e-2, bandwidth=0.05), seed=seed + 10)
        before = metrics.recovery(dirs, sae.W_dec.detach())
        train_sae(sae, x, TrainConfig(steps=300, batch_size=256, lr=1e-2, seed=seed), progress=False)
        after = metrics.recovery(dirs, sae.W_dec.detach())
        with torch.no_grad():
            out = sae(x)
        l0, error = (out.latents > 0).sum(1).float().mean().item(), ((out.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        assert after > 0.88 > 0.7 > before and 2.0 < l0 < 5.0 and error < 0.15, (seed, before, after, l0, error)


def test_bad_config_and_objective():
    with pytest.raises(ValueError, match="sparsity_loss must be one of 'step', 'tanh', 'quadratic'; got 'l1'"):
        JumpReLUConfig(8, 16, sparsity_loss="l1")
    with pytest.raises(ValueError, match="sparsity_loss='quadratic' needs target_l0"):
        JumpReLUConfig(8, 16, sparsity_loss="quadratic")
    with pytest.raises(ValueError, match=r"target_l0 must be > 0 and <= 16"):
        JumpReLUConfig(8, 16, sparsity_loss="quadratic", target_l0=17)
    with pytest.raises(ValueError, match="target_l0 belongs to sparsity_loss='quadratic', not 'step'"):
        JumpReLUConfig(8, 16, target_l0=3)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        JumpReLUConfig(8, 16, bandwidth=0)
    with pytest.raises(ValueError, match="init_threshold must be >= 0"):
        JumpReLUConfig(8, 16, init_threshold=-0.1)
    with pytest.raises(ValueError, match="sae must be a JumpReLUSAE"):
        JumpReLUObjective(BatchTopKSAE(BatchTopKConfig(8, 16, 2)))
    with pytest.raises(ValueError, match="pre_act_coef must be >= 0"):
        JumpReLUObjective(make(), pre_act_coef=-1)


# ----------------------------------------------------------------------------- the family in a shipped model

SITE, BLOCK = "blocks.1.hook_resid_post", "transformer.h.1"
FAMILY = {
    "jumprelu": lambda d: JumpReLUSAE(JumpReLUConfig(d, 256, init_threshold=0.5)),
    "batchtopk": lambda d: BatchTopKSAE(BatchTopKConfig(d, 256, 8)),
    "matryoshka": lambda d: MatryoshkaSAE(MatryoshkaConfig(d, 256, 8)),
}


@pytest.fixture(scope="module")
def stories():
    hf, tokenizer = zoo.load_pretrained("stories")
    ids = torch.randint(1, hf.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    return hf, sites.wrap(hf, tokenizer), ids


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_splice_evaluate_and_summarize_in_a_shipped_model(name, stories, tmp_path):
    hf, model, ids = stories
    acts = sites.read_acts(model, ids, SITE)[SITE]
    sae = FAMILY[name](acts.shape[-1])
    sae.init_b_dec_(acts.flatten(0, 1))
    train_sae(sae, acts.flatten(0, 1), TrainConfig(steps=3, batch_size=24, lr=1e-3), progress=False)  # ends in eval mode
    sae = load_sae(save_sae(sae, tmp_path / name, hook_name=SITE, model_name="stories"))  # what a user would splice
    assert not sae.training and (sae.threshold > 0).all()

    def hook(module, args, output):  # the raw torch version of the splice
        h = output[0] if isinstance(output, tuple) else output
        x_hat = sae(h).x_hat
        return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

    with torch.no_grad():
        out = sites.run(model, ids, [Splice(SITE, sae)])
        handle = hf.get_submodule(BLOCK).register_forward_hook(hook)
        try:
            expected = hf(ids).logits
        finally:
            handle.remove()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    latents = out.outputs[SITE].latents
    with torch.no_grad():
        assert torch.equal(latents, sae(acts).latents)
    report = evaluate_sae(model, sae, SITE, ids)
    l0 = (latents[:, 1:] > 0).sum(-1).float().mean().item()  # evaluate_sae drops each sequence's first token
    assert report["l0"] == pytest.approx(l0) and 0 < report["l0"] < 256 and report["fvu"] == report["fvu"]
    summary = summarize_features(latents, ids, lambda i: f"t{i}", W_dec=sae.W_dec, W_U=hf.lm_head.weight.t())
    assert len(summary) == 256 and summary.table["density"].sum() == pytest.approx((latents > 0).float().sum(-1).mean().item())
