"""Binary autoencoder: estimators by hand, objective terms on known distributions, entropy tracking, files."""

import math

import pytest
import torch

from nbfeatures.sae.binary import (
    BinaryAE, BinaryConfig, BinaryObjective, binary_entropy_bits, binary_step, deviation_acts, deviation_scores, feature_set_entropy,
    minibatch_entropy, offdiag_covariance,
)
from nbfeatures.sae.io import load_sae, save_sae
from nbfeatures.train import TrainConfig, train_sae


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("estimator", ["ste", "sigmoid_ste", "reference"])
def test_step_forward_and_estimator_gradients_by_hand(estimator):
    z = torch.tensor([-2.0, -0.1, 0.0, 0.5, 3.0], requires_grad=True)
    h = binary_step(z, estimator)
    assert h.tolist() == [0, 0, 0, 1, 1]
    g = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.0])
    torch.autograd.backward(h, g)
    s = 1 / (1 + torch.exp(-z.detach()))
    expected = {"ste": g, "sigmoid_ste": g * s * (1 - s), "reference": g * (1 - g)}[estimator]
    torch.testing.assert_close(z.grad, expected)
    if estimator == "reference":  # e.g. 0.5 * (1 - 0.5) = 0.25 and -1 * (1 - -1) = -2
        assert z.grad[:2].tolist() == [0.25, -2.0]


def test_entropy_terms_on_known_distributions():
    assert binary_entropy_bits(torch.tensor(0.5)).item() == pytest.approx(1.0)
    assert binary_entropy_bits(torch.tensor(0.0)).item() == pytest.approx(0.0, abs=1e-8)
    bits = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    # bit 0 always on (0 bits), bits 1 and 2 fire half the time (1 bit each)
    assert minibatch_entropy(bits).item() == pytest.approx(2.0, abs=1e-6)
    # bits 1 and 2 are perfectly anti-correlated: cov = -1/3 each way (unbiased), bit 0 constant
    assert offdiag_covariance(bits).item() == pytest.approx(2 / 3, abs=1e-6)


def test_objective_switches_entropy_on_after_warmup_and_adds_terms():
    torch.manual_seed(0)
    bae = BinaryAE(BinaryConfig(8, 32))
    obj = BinaryObjective(bae, entropy_coef=0.5, cov_coef=0.25, entropy_start=2)
    x = torch.randn(64, 8)
    for step in range(3):
        loss, logs = obj(x)
        expected = logs["mse"] + 0.25 * logs["cov"] + (0.5 * logs["entropy_bits"] if step >= 2 else 0.0)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert logs["entropy_on"] == float(step >= 2)
    obj2 = BinaryObjective(bae, entropy_start=2)
    obj2.load_state_dict(obj.state_dict())
    assert obj2.step == 3


def independent_factors(n, p, d=24, seed=0):
    """x = sum_i b_i v_i, b_i ~ Bernoulli(p_i) independent, v_i orthogonal: true entropy sum_i Hb(p_i) bits."""
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(d, len(p), generator=g))[0].t() * 3
    b = (torch.rand(n, len(p), generator=g) < torch.tensor(p)).float()
    return b @ V + 0.05 * torch.randn(n, d, generator=g)


def entropy_curve(seed, entropy_coef, cov_coef, m=8):
    bae = BinaryAE(BinaryConfig(24, 32, estimator="sigmoid_ste"), seed=seed)
    obj = BinaryObjective(bae, entropy_coef=entropy_coef, cov_coef=cov_coef, entropy_start=200)
    train_sae(bae, independent_factors(8192, [0.5] * m, seed=seed), TrainConfig(steps=600, batch_size=512, lr=3e-3, seed=seed),
              objective=obj, progress=False)
    true, est = [], []
    for active in range(0, m + 1, 2):  # sets in which only `active` of the m factors vary
        p = [0.5] * active + [0.0] * (m - active)
        true.append(sum(binary_entropy_bits(torch.tensor(q)).item() for q in p))
        est.append(feature_set_entropy(bae, independent_factors(4096, p, seed=seed)))
    return true, est


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_set_entropy_tracks_the_true_entropy(seed):
    """Measured (seeds 0, 1): estimates 0.85 -> 8.88 and 1.55 -> 8.01 bits for true 0 -> 8."""
    true, est = entropy_curve(seed, entropy_coef=0.02, cov_coef=0.01)
    corr = torch.corrcoef(torch.tensor([true, est]))[0, 1].item()
    slope = (est[-1] - est[0]) / (true[-1] - true[0])
    assert corr > 0.95, (true, est)
    assert 0.6 < slope < 1.4, (true, est)
    assert all(b > a for a, b in zip(est, est[1:])), est


def test_without_entropy_and_covariance_terms_the_estimate_does_not_track():
    """Redundant, correlated bits: the summed marginals overestimate (measured 31.8 bits for 8)."""
    true, est = entropy_curve(0, entropy_coef=0.0, cov_coef=0.0)
    assert est[-1] > 2 * true[-1], (true, est)


def test_deviation_scores_count_a_dense_bit_switching_off():
    bits = torch.tensor([[1.0, 0.0]] * 9 + [[0.0, 1.0]])
    s = deviation_scores(bits)
    assert s[9, 0] > s[0, 0] + 3  # the usually-on bit switching off stands out
    assert s[9, 1] > s[0, 1] + 3  # as does the rare bit switching on
    assert s[9, 0].item() == pytest.approx(math.log2(0.9 + 1e-6), rel=1e-6)


def test_save_load_and_saelens_registration(tmp_path):
    torch.manual_seed(0)
    bae = BinaryAE(BinaryConfig(8, 32, estimator="sigmoid_ste"))
    save_sae(bae, tmp_path, hook_name="blocks.1.hook_resid_post")
    loaded = load_sae(tmp_path)
    x = torch.randn(20, 8)
    assert isinstance(loaded, BinaryAE) and loaded.cfg == bae.cfg
    assert torch.equal(loaded(x).x_hat, bae(x).x_hat)
    sae_lens = pytest.importorskip("sae_lens")
    from nbfeatures.sae.saelens import register_with_saelens

    register_with_saelens()
    register_with_saelens()  # idempotent
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), bae(x).latents)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), bae(x).x_hat, atol=1e-6, rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="estimator must be"):
        BinaryConfig(8, 32, estimator="tanh")
    with pytest.raises(ValueError, match="need d_in > 0"):
        BinaryConfig(-1, 32)
    bae = BinaryAE(BinaryConfig(8, 32))
    with pytest.raises(ValueError, match="entropy_coef must be >= 0"):
        BinaryObjective(bae, entropy_coef=-1e-3)
    with pytest.raises(ValueError, match="expected d_in=8"):
        bae(torch.randn(3, 9))


def test_estimator_gradients_through_the_encoder_by_hand():
    """One bit, one input: x = 2, w = 0.5, b = -0.25, so z = 0.75, h = 1; loss = (h * u - 3)^2 with u = 1."""
    z = torch.tensor(0.75)
    dh = 2 * (1 * 1.0 - 3.0) * 1.0  # d loss / d h = 2 (x_hat - target) u = -4
    sig = 1 / (1 + math.exp(-0.75))
    by_hand = {"ste": dh, "sigmoid_ste": dh * sig * (1 - sig), "reference": dh * (1 - dh)}  # -4, -0.8716, -20
    for estimator, dz in by_hand.items():
        bae = BinaryAE(BinaryConfig(1, 1, estimator=estimator))
        with torch.no_grad():
            bae.W_enc.fill_(0.5), bae.b_enc.fill_(-0.25), bae.W_dec.fill_(1.0), bae.b_dec.fill_(0.0)
        out = bae(torch.tensor([[2.0]]))
        assert out.pre_acts.item() == pytest.approx(z.item()) and out.latents.item() == 1.0
        torch.autograd.backward((out.x_hat - 3.0).pow(2).sum())
        assert bae.b_enc.grad.item() == pytest.approx(dz, rel=1e-5), estimator
        assert bae.W_enc.grad.item() == pytest.approx(2.0 * dz, rel=1e-5), estimator  # dz/dw = x = 2
        assert bae.W_dec.grad.item() == pytest.approx(dh, rel=1e-5)  # the decoder's gradient needs no estimator
    assert by_hand["sigmoid_ste"] == pytest.approx(-0.87158, abs=1e-4) and by_hand["reference"] == -20.0


def test_minibatch_entropy_of_known_firing_rates():
    # 8 tokens; bit 0 fires on 2 (p = 1/4), bit 1 on 4 (p = 1/2), bit 2 on 8 (p = 1)
    bits = torch.zeros(8, 3)
    bits[:2, 0], bits[:4, 1], bits[:, 2] = 1, 1, 1
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.8113 bits
    assert minibatch_entropy(bits).item() == pytest.approx(h_quarter + 1.0, abs=1e-6)
    # independent bits: covariance zero; identical bits: |cov| = p (1 - p) n / (n - 1) each way
    same = torch.stack([bits[:, 1], bits[:, 1]], 1)
    assert offdiag_covariance(same).item() == pytest.approx(2 * 0.25 * 8 / 7, abs=1e-6)


def test_more_bad_input():
    bae = BinaryAE(BinaryConfig(8, 32))
    with pytest.raises(ValueError, match="cov_coef must be >= 0"):
        BinaryObjective(bae, cov_coef=-1.0)
    with pytest.raises(ValueError, match="entropy_start must be >= 0"):
        BinaryObjective(bae, entropy_start=-5)
    with pytest.raises(ValueError, match="need d_in > 0 and d_sae > 0"):
        BinaryConfig(8, 0)
    with pytest.raises(ValueError, match="expected d_in=8"):
        feature_set_entropy(bae, torch.randn(10, 4))


def test_deviation_acts_fire_when_a_bit_leaves_its_usual_state():
    bits = torch.tensor([[1.0, 0.0]] * 9 + [[0.0, 1.0]])  # bit 0 usually on, bit 1 usually off
    a = deviation_acts(bits)
    assert a[:9].abs().sum() == 0  # the usual state is "off" for both
    assert a[9].tolist() == pytest.approx([0.9, 0.9])  # both leave it on the last token, by |h - mean|
    assert deviation_acts(bits, torch.tensor([0.2, 0.2]))[0].tolist() == pytest.approx([0.8, 0.0])
