"""BatchTopK SAE: the exact batch top-k, the loss and every gradient against the dense obvious version, the threshold
estimate, inference as a JumpReLU, SAELens's own code as the oracle (activation, threshold update, saved folder), and
planted directions recovered."""

import pytest
import torch

from nbfeatures.sae import BatchTopKConfig, BatchTopKObjective, BatchTopKSAE, JumpReLUConfig, JumpReLUSAE, load_sae, save_sae
from nbfeatures.sae.base import fvu
from nbfeatures.sae import blocked
from nbfeatures.sae.batchtopk import batch_topk
from nbfeatures.sae.blocked import BLOCK_SIZE
from nbfeatures.train import TrainConfig, train_sae
from nbfeatures import metrics
from nbfeatures.evals import planted_directions
from sae_support import grads, reloads_exactly

pytestmark = pytest.mark.usefixtures("one_thread")


def make(d_in=8, d_sae=16, k=3, seed=0, dtype=torch.float64):
    sae = BatchTopKSAE(BatchTopKConfig(d_in, d_sae, k), seed=seed).to(dtype)
    with torch.no_grad():  # off the tied init, so encoder and decoder gradients differ
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.W_enc.add_(0.05 * torch.randn(d_in, d_sae, generator=g))
    return sae


def dense_batch_topk(pre, n_keep):
    """The obvious version: sort every relu'd value of the batch, keep the n_keep largest."""
    flat = torch.relu(pre).flatten()
    idx = flat.topk(n_keep).indices
    return torch.zeros_like(flat).scatter(0, idx, flat[idx]).view(pre.shape)


def dense_reference(sae, x, k):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    latents = dense_batch_topk(pre, k * len(x))
    return latents @ sae.W_dec + sae.b_dec, latents, pre


@pytest.mark.parametrize("skew", [False, True])
def test_batch_topk_is_exact(skew):
    """Skewed rows (a few tokens hold most of the batch's top values) force the second, wider read."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 200, generator=g)
    if skew:
        pre[:3] += 4.0
    _, idx, keep = batch_topk(pre, 5 * 64)
    ours = torch.zeros_like(pre).scatter_add(1, idx, torch.relu(pre.gather(1, idx)) * keep)
    assert torch.equal(ours, dense_batch_topk(pre, 5 * 64))
    if skew:  # the 2k = 10 candidates per token did not hold the skewed tokens' values
        assert idx.shape[1] > 10
    few = -torch.rand(64, 200, generator=g)  # fewer positive values than k * N: all of them, the rest 0
    few[0, :7] = 1.0
    _, idx, keep = batch_topk(few, 5 * 64)
    assert torch.equal(torch.zeros_like(few).scatter_add(1, idx, torch.relu(few.gather(1, idx)) * keep), torch.relu(few))


@pytest.mark.parametrize("case", ["plain", "skew", "few positive"])
@pytest.mark.parametrize("block, tile", [(200, 1 << 24), (7, 28), (64, 64)])
def test_blocked_batch_topk_equals_the_dense_choice(case, block, tile, monkeypatch):
    """Tiles of `block` latents x tile/block tokens (d_sae 200 not a multiple of 7 or 64); the wide re-read of skewed
    tokens in chunks of tile/200 rows (at least 1)."""
    monkeypatch.setattr(blocked, "_TILE", tile)
    g = torch.Generator().manual_seed(5)
    x, W, b = torch.randn(64, 12, generator=g), torch.randn(12, 200, generator=g), 0.1 * torch.randn(200, generator=g)
    if case == "skew":
        x[:3] *= 5.0
    if case == "few positive":
        b -= 8.0
    pre = torch.addmm(b, x, W)
    aux_F = torch.rand(200, generator=g) < 0.3
    vals, idx, keep, aux_vals, aux_idx = blocked.blocked_batch_topk(x, W, b, 5, block, aux_F, 4)
    dense = lambda v, i, k: torch.zeros_like(pre).scatter_add(1, i, torch.relu(v) * k)  # noqa: E731
    torch.testing.assert_close(dense(vals, idx, keep), dense_batch_topk(pre, 5 * 64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vals[keep], pre.gather(1, idx)[keep], atol=1e-5, rtol=1e-5)  # the values are pre's
    if case == "skew":  # the skewed tokens hold more of the top values than their 2k candidates: the wide read ran
        assert idx.shape[1] > 10
    want = pre.masked_fill(~aux_F, float("-inf")).topk(4, dim=1).values  # AuxK's candidates from the same pass
    torch.testing.assert_close(aux_vals.sort(dim=1, descending=True).values, want, atol=1e-5, rtol=1e-5)
    assert aux_F[aux_idx].all()


def test_batch_topk_matches_saelens():
    sae_lens = pytest.importorskip("sae_lens.saes.batchtopk_sae")
    pre = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    _, idx, keep = batch_topk(pre, 4 * 32)
    ours = torch.zeros_like(pre).scatter_add(1, idx, torch.relu(pre.gather(1, idx)) * keep)
    assert torch.equal(ours, sae_lens.BatchTopK(4)(pre))


# block: the dense path (None), one tile (the default), and tiles of 5 latents x 4 tokens
@pytest.mark.parametrize("block", [None, BLOCK_SIZE, 5])
@pytest.mark.parametrize("aux, skew", [(False, False), (True, False), (True, True)])
def test_objective_loss_and_every_gradient_match_the_dense_reference(aux, skew, block, monkeypatch):
    """skew: one token holds most of the batch's top values, so it is read with more than 2k candidates (padding)."""
    monkeypatch.setattr(blocked, "_TILE", 20)  # a block of 5 latents: 4 tokens per tile; the wide read 1 row at a time
    sae = make()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if skew:
        x[0] *= 6
        assert sae.encode_batch(x)[1].shape[1] > 6
    obj = BatchTopKObjective(sae, aux_coef=0.5 if aux else 0.0, k_aux=3, dead_tokens=1, block_size=block)
    obj.firing.tokens_since_fired[:] = 5  # every latent dead but those that fire in this batch
    loss, logs = obj(x)
    torch.autograd.backward(loss)
    fast = grads(sae)
    sae.zero_grad()
    x_hat, latents, pre = dense_reference(sae, x, 3)
    ref = fvu(x_hat, x)
    dead = ~(latents > 0).any(0)
    if aux:
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(3, dim=1)
        e_hat = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals)) @ sae.W_dec
        ref = ref + 0.5 * fvu(e_hat, (x - x_hat).detach())
    torch.autograd.backward(ref)
    assert dead.any() and logs["dead_fraction"] == pytest.approx(dead.double().mean().item())
    assert logs["l0"] == pytest.approx((latents > 0).sum(1).double().mean().item()) and ("aux_loss" in logs) == aux
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for name, g in grads(sae).items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(fast[name], g, atol=1e-6, rtol=1e-6, msg=name)


def test_threshold_starts_at_the_first_batch_and_converges_to_the_kB_th_value():
    sae = make()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    obj = BatchTopKObjective(sae, aux_coef=0.0, threshold_lr=0.05)
    with torch.no_grad():
        kth = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).flatten().topk(3 * 6).values[-1]
        obj(x)
        assert sae.threshold[0] == kth  # the first estimate, taken whole
        sae.threshold.fill_(5.0)
        history = [obj(x)[1]["threshold"] for _ in range(300)]
    assert history[0] == pytest.approx(0.95 * 5.0 + 0.05 * kth.item())  # one EMA step
    assert abs(history[-1] - kth.item()) < 1e-5 * 5.0 and (sae.threshold == sae.threshold[0]).all()


def test_threshold_update_matches_saelens():
    batchtopk_sae = pytest.importorskip("sae_lens.saes.batchtopk_sae")
    theirs = batchtopk_sae.BatchTopKTrainingSAE(batchtopk_sae.BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=3, topk_threshold_lr=0.01))
    ours = make(dtype=torch.float32)
    acts = torch.relu(torch.randn(6, 16, generator=torch.Generator().manual_seed(4)))
    theirs.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    ours.threshold.fill_(0.7)
    for _ in range(5):
        theirs.update_topk_threshold(acts)
        ours.update_threshold_(acts, 0.01)
    assert ours.threshold[0].item() == pytest.approx(theirs.topk_threshold.item(), rel=1e-6)


def test_eval_mode_is_the_jumprelu_of_its_threshold_and_forward_is_decode_of_encode():
    sae = make(dtype=torch.float32)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        sae.threshold.fill_(0.4)
        train_out = sae(x)  # training mode: the batch's top k * 10
        assert (train_out.latents > 0).sum() == 3 * 10
        torch.testing.assert_close(sae.decode(sae.encode(x)), train_out.x_hat)
        sae.eval()
        out = sae(x)
        jr = JumpReLUSAE(JumpReLUConfig(8, 16))
        jr.load_state_dict(sae.state_dict())
        ref = jr(x)
        assert torch.equal(out.x_hat, ref.x_hat) and torch.equal(out.latents, ref.latents)
        assert torch.equal(out.latents, torch.relu(out.pre_acts) * (out.pre_acts > 0.4))
        torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat)
        assert out.x_hat.shape == (2, 5, 8) and out.latents.shape == (2, 5, 16)


def test_save_load_is_bit_exact_and_saelens_loads_it_as_its_jumprelu(tmp_path):
    sae = make(dtype=torch.float32).eval()
    with torch.no_grad():
        sae.threshold.fill_(0.35)
    back, theirs = reloads_exactly(sae, save_sae(sae, tmp_path / "btk", hook_name="blocks.1.hook_resid_post"), 2 * torch.randn(20, 8))
    assert back.metadata["training_architecture"] == "batchtopk" and back.metadata["training_architecture_details"] == {"k": 3}
    assert type(theirs).__name__ == "JumpReLUSAE" and torch.equal(theirs.threshold, torch.full((16,), 0.35))


def test_a_saelens_batchtopk_inference_folder_loads_as_ours(tmp_path):
    batchtopk_sae = pytest.importorskip("sae_lens.saes.batchtopk_sae")
    theirs = batchtopk_sae.BatchTopKTrainingSAE(batchtopk_sae.BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=3))
    theirs.topk_threshold = torch.tensor(0.2, dtype=torch.double)
    theirs.save_inference_model(str(tmp_path))  # folds its decoder norms: unit rows, as ours
    ours = load_sae(tmp_path)
    assert type(ours) is BatchTopKSAE and ours.cfg.k == 3
    x = torch.randn(10, 8)
    with torch.no_grad():
        inference = __import__("sae_lens").SAE.load_from_disk(str(tmp_path), device="cpu")
        torch.testing.assert_close(ours(x).x_hat, inference(x), atol=1e-5, rtol=1e-5)


def test_resuming_gives_the_weights_and_threshold_of_an_uninterrupted_run(tmp_path):
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(5))
    cfg = dict(batch_size=32, lr=3e-3)

    def run(steps, folder):
        sae = BatchTopKSAE(BatchTopKConfig(8, 16, 3))
        train_sae(sae, x, TrainConfig(steps=steps, checkpoint_dir=str(folder), **cfg), progress=False)
        return sae

    straight = run(6, tmp_path / "a")
    run(3, tmp_path / "b")
    resumed = run(6, tmp_path / "b")
    assert straight.threshold[0] > 0
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())


def test_planted_directions_are_recovered():
    """300 steps on three seeds (worst seen: best cosine 0.914, FVU 0.18 at inference); thresholds below the worst."""
    for seed in range(3):
        x, _, dirs = planted_directions(8192, 24, 32, 3 / 32, seed=seed)
        sae = BatchTopKSAE(BatchTopKConfig(24, 64, 3), seed=seed + 10)  # seeds apart: its random rows are not the planted ones
        before = metrics.recovery(dirs, sae.W_dec.detach())
        train_sae(sae, x, TrainConfig(steps=300, batch_size=256, lr=3e-3, seed=seed), progress=False)
        after = metrics.recovery(dirs, sae.W_dec.detach())
        assert after > 0.88 > 0.7 > before, (seed, before, after)
        with torch.no_grad():  # eval mode: each token against the learned threshold, about k latents each
            out = sae(x)
        l0, error = (out.latents > 0).sum(1).float().mean().item(), fvu(out.x_hat, x).item()
        assert 2.0 < l0 < 4.0 and error < 0.25, (seed, l0, error)


def test_bad_config_and_objective():
    with pytest.raises(ValueError, match=r"BatchTopKConfig: need 0 < k <= d_sae, got k=17, d_sae=16"):
        BatchTopKConfig(8, 16, 17)
    with pytest.raises(ValueError, match=r"need 0 < k <= d_sae, got k=2.5"):
        BatchTopKConfig(8, 16, 2.5)
    with pytest.raises(ValueError, match="d_in > 0"):
        BatchTopKConfig(0, 16, 2)
    with pytest.raises(ValueError, match="sae must be a BatchTopKSAE"):
        BatchTopKObjective(JumpReLUSAE(JumpReLUConfig(8, 16)))
    with pytest.raises(ValueError, match="threshold_lr must be > 0 and <= 1"):
        BatchTopKObjective(make(), threshold_lr=0)
    with pytest.raises(ValueError, match=r"input has width 7 \(shape \[3, 7\]\), expected d_in=8"):
        BatchTopKObjective(make())(torch.randn(3, 7))
