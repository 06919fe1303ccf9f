"""The shared training loop: ground-truth recovery, exact resume, AuxK, checkpoints, bad input."""

import json

import pytest
import torch

from nbfeatures import metrics
from nbfeatures.harvest import TensorSource
from nbfeatures.sae.relu import ReLUConfig, ReLUObjective, ReLUSAE
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from nbfeatures.train import TrainConfig, latest_checkpoint, train_sae


def planted(n=16384, d=32, n_true=48, k_true=3, seed=0):
    """x = sum of k_true random unit directions (out of n_true) with positive magnitudes, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    true = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    idx = torch.rand(n, n_true, generator=g).topk(k_true, dim=1).indices
    mags = torch.rand(n, k_true, generator=g) + 0.5
    codes = torch.zeros(n, n_true).scatter(1, idx, mags)
    return codes @ true + 0.3, true


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_recovers_planted_directions(seed):
    x, true = planted(seed=seed)
    sae = TopKSAE(TopKConfig(32, 96, 3), seed=seed)
    sae.init_b_dec_(x[:2048])
    hist = train_sae(sae, x, TrainConfig(steps=600, batch_size=256, lr=3e-3, seed=seed), progress=False)
    with torch.no_grad():
        out = sae(x[:4096])
    assert metrics.recovery(true, sae.W_dec) > 0.9
    assert metrics.fvu(out.x_hat, x[:4096]) < 0.1
    assert hist["fvu"].iloc[-1] < hist["fvu"].iloc[0] / 4
    assert list(hist.columns[:4]) == ["step", "lr", "tokens", "elapsed_s"]


def test_relu_sae_trains_and_is_sparse():
    x, true = planted(seed=3)
    sae = ReLUSAE(ReLUConfig(32, 96))
    sae.init_b_dec_(x[:2048])
    hist = train_sae(sae, x, TrainConfig(steps=600, batch_size=256, lr=3e-3), objective=ReLUObjective(sae, l1_coef=0.3), progress=False)
    assert hist["fvu"].iloc[-1] < 0.15  # measured 0.084 at l1_coef=0.3
    assert hist["l0"].iloc[-1] < 15  # measured 9.6 (3 true directions per token)
    assert metrics.recovery(true, sae.W_dec) > 0.9  # measured 0.969


@pytest.mark.parametrize("seed", [4, 5])
def test_auxk_revives_dead_latents(seed):
    """Latents that fire weakly but never make the top-k stay dead without AuxK; AuxK pulls them in.

    (Latents with negative pre-activations get no AuxK gradient through its ReLU, as in the
    reference code, so the starved latents here have shrunken encoders, not negative biases.)
    Measured over seeds 4-6: dead 0.75 -> 0.54-0.57, FVU 0.35-0.37 -> 0.18-0.22.
    """
    x, _ = planted(seed=seed, n_true=128)
    dead, fvu = {}, {}
    for aux in (0.0, 1 / 32):
        sae = TopKSAE(TopKConfig(32, 256, 3), seed=seed)
        with torch.no_grad():
            sae.W_enc[:, 64:] *= 0.05
        obj = TopKObjective(sae, aux_coef=aux, dead_tokens=2048)
        train_sae(sae, x, TrainConfig(steps=300, batch_size=256, lr=3e-3), objective=obj, progress=False)
        with torch.no_grad():
            out = sae(x)
        dead[aux], fvu[aux] = metrics.dead_fraction(metrics.feature_density(out.latents)), metrics.fvu(out.x_hat, x)
    assert dead[0.0] == 0.75  # the starved quarter-to-three-quarters never fire without AuxK
    assert dead[1 / 32] < dead[0.0] - 0.12, dead
    assert fvu[1 / 32] < fvu[0.0] - 0.1, fvu


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path):
    x, _ = planted(n=4096, seed=5)

    def run(ckpt_dir, interrupt_at=None):
        sae = TopKSAE(TopKConfig(32, 64, 3), seed=0)
        cfg = TrainConfig(steps=30, batch_size=128, lr=3e-3, checkpoint_every=10, checkpoint_dir=str(ckpt_dir), warmup_steps=5,
                          decay_fraction=0.3)

        def stop(step, row):
            if step == interrupt_at:
                raise KeyboardInterrupt

        obj = TopKObjective(sae, dead_tokens=500)
        try:
            hist = train_sae(sae, x, cfg, objective=obj, callbacks=[stop], progress=False)
        except KeyboardInterrupt:
            return None, None
        return sae, hist

    straight, hist_straight = run(tmp_path / "a")
    assert run(tmp_path / "b", interrupt_at=20) == (None, None)  # dies before step 20's checkpoint
    assert latest_checkpoint(tmp_path / "b").name == "step_00000010"
    resumed, hist_resumed = run(tmp_path / "b")
    for name, p in straight.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    assert hist_resumed.drop(columns="elapsed_s").equals(hist_straight.drop(columns="elapsed_s"))


def test_checkpoint_folder_contents_and_partial_writes_ignored(tmp_path):
    x, _ = planted(n=2048, seed=6)
    sae = TopKSAE(TopKConfig(32, 64, 3))
    (tmp_path / ".tmp_step_00000099").mkdir()  # what a crash mid-write leaves behind
    train_sae(sae, x, TrainConfig(steps=10, batch_size=128, checkpoint_every=5, checkpoint_dir=str(tmp_path)), progress=False)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000010"
    assert sorted(p.name for p in latest.iterdir()) == ["dictionary.safetensors", "objective.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 10


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    x, _ = planted(n=2048, seed=7)
    train_sae(TopKSAE(TopKConfig(32, 64, 3)), x, TrainConfig(steps=5, batch_size=128, checkpoint_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="holds another run: its module is TopKSAE, this run's is ReLUSAE"):
        train_sae(ReLUSAE(ReLUConfig(32, 64)), x, TrainConfig(steps=9, batch_size=128, checkpoint_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="its module config is .*'d_sae': 64.*this run's is .*'d_sae': 65"):
        train_sae(TopKSAE(TopKConfig(32, 65, 3)), x, TrainConfig(steps=9, batch_size=128, checkpoint_dir=str(tmp_path)), progress=False)
    (latest_checkpoint(tmp_path) / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        train_sae(TopKSAE(TopKConfig(32, 64, 3)), x, TrainConfig(steps=9, batch_size=128, checkpoint_dir=str(tmp_path)), progress=False)


def test_callbacks_and_bad_input():
    x, _ = planted(n=1024, seed=8)
    rows = []
    train_sae(TopKSAE(TopKConfig(32, 64, 3)), x, TrainConfig(steps=20, batch_size=128, log_every=5), callbacks=[lambda s, r: rows.append((s, r["fvu"]))],
              progress=False)
    assert [s for s, _ in rows] == [5, 10, 15, 20]
    bad = x.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        train_sae(TopKSAE(TopKConfig(32, 64, 3)), bad, TrainConfig(steps=20, batch_size=1024), progress=False)
    with pytest.raises(ValueError, match="steps must be > 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_dir"):
        TrainConfig(steps=5, checkpoint_every=2)
    with pytest.raises(ValueError, match="at least batch_size=4096"):
        TensorSource(x, 4096)


def test_tensor_source_is_deterministic_and_covers_each_epoch():
    acts = torch.arange(40).float()[:, None]
    a, b = TensorSource(acts, 8, seed=1), TensorSource(acts, 8, seed=1)
    epoch = torch.cat([a.batch(s) for s in range(5)])
    assert sorted(epoch.flatten().tolist()) == list(range(40))
    assert torch.equal(b.batch(3), a.batch(3)) and torch.equal(a.batch(7), TensorSource(acts, 8, seed=1).batch(7))
    assert not torch.equal(a.batch(5), a.batch(0))


def test_an_interrupted_run_ends_in_eval_mode_and_a_refused_resume_leaves_the_module_alone(tmp_path):
    x, _ = planted(n=1024, seed=9)
    sae = TopKSAE(TopKConfig(32, 64, 3))

    def stop(step, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(sae, x, TrainConfig(steps=20, batch_size=128, log_every=5), callbacks=[stop], progress=False)
    assert not sae.training
    train_sae(TopKSAE(TopKConfig(32, 64, 3)), x, TrainConfig(steps=5, batch_size=128, checkpoint_dir=str(tmp_path)), progress=False)
    (latest_checkpoint(tmp_path) / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    fresh = TopKSAE(TopKConfig(32, 64, 3), seed=7)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer.safetensors"):
        train_sae(fresh, x, TrainConfig(steps=9, batch_size=128, checkpoint_dir=str(tmp_path)), progress=False)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_the_loop_steps_with_fused_adamw_also_after_resuming_a_checkpoint_saved_without_it(tmp_path):
    """A checkpoint's optimizer groups carry the `fused` flag; one written before the loop used the fused kernel says
    None, and loading it as it is would put the resumed run back on the slow kernel."""
    from nbfeatures.train import _optimizer, load_checkpoint

    x, _ = planted(n=1024, seed=6)
    sae = TopKSAE(TopKConfig(32, 64, 3), seed=0)
    obj = TopKObjective(sae, dead_tokens=500)
    cfg = TrainConfig(steps=4, batch_size=128, lr=3e-3, checkpoint_every=2, checkpoint_dir=str(tmp_path), warmup_steps=1)
    train_sae(sae, x, cfg, objective=obj, progress=False)
    path = latest_checkpoint(tmp_path)
    state = json.loads((path / "trainer_state.json").read_text())
    assert [g["fused"] for g in state["optimizer"]["param_groups"]] == [True]  # what the loop used
    for g in state["optimizer"]["param_groups"]:
        g["fused"] = None  # as written before
    (path / "trainer_state.json").write_text(json.dumps(state))
    opt = _optimizer(sae, obj, 3e-3, cfg)
    load_checkpoint(path, sae, opt, obj, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    meta = TopKSAE(TopKConfig(32, 64, 3), seed=0).to("meta")
    assert _optimizer(meta, None, 3e-3, cfg).param_groups[0]["fused"] is None  # no fused kernel there: the default one
