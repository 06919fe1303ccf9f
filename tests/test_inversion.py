"""InversionView: distance, decoder conditioning, training data, sampling, save/load, the panel (headless)."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import BOS, tiny_hf, word_tokenizer
from nbfeatures import sites as S
from nbfeatures.train import latest_checkpoint
from nbfeatures.inversion import (
    DecoderConfig, FeatureSite, RebalanceConfig, decoder_train_config, InversionDecoder, PairSource, default_sites, distance, feature_query,
    generate, inside_fractions, site_acts, strongest_latent,
    load_decoder, panel_callables, query_activation, read_sites, real_positions, sample, save_decoder, sequence_loss,
    train_decoder,
)
from nbfeatures.plots.inversion import inversion_samples, query_html, shared_tokens
from nbfeatures.widgets import figure as figure_mod
from nbfeatures.widgets.inversion import InversionPanel

SITE = "blocks.0.hook_resid_pre"
N_TOK = 8  # inputs use tokens 0..7 after BOS


@pytest.fixture(scope="module")
def gpt2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return S.wrap(tiny_hf("gpt2"), tokenizer=word_tokenizer())


def inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.full((n, 1), BOS), torch.randint(0, N_TOK, (n, 2), generator=g)], 1)


class Pool:
    """A fixed pool of pairs from one PairSource call, so the tiny decoders train in seconds."""

    def __init__(self, source, n=2048, zero=False):
        self.sites, self.zero = source.sites, zero
        self.z, self.ids, self.site = source.batch(n, seed=0)

    def batch(self, n, seed):
        i = torch.randint(0, len(self.ids), (n,), generator=torch.Generator().manual_seed(seed))
        return (self.z[i] * 0 if self.zero else self.z[i]), self.ids[i], self.site[i]


def tiny_config(**kw):
    return DecoderConfig(**{"vocab_size": 64, "n_ctx": 3, "sites": (SITE,), "d_act": 32, "bos_id": BOS, "d_model": 32,
                            "n_heads": 2, "n_layers": 1, "n_act_blocks": 1, **kw})  # fmt: skip


@pytest.fixture(scope="module")
def trained(gpt2):
    """(conditioned decoder, decoder trained with z always zero): same data, same steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    pool = Pool(PairSource(gpt2, [SITE], inputs))
    out = []
    for zero in (False, True):
        torch.manual_seed(0)
        dec = InversionDecoder(tiny_config())
        train_decoder(dec, _with_zero(pool, zero), decoder_train_config(steps=100, batch_size=64, lr=1e-2, warmup_steps=10), progress=False)
        out.append(dec)
    torch.set_num_threads(threads)
    return out


def _with_zero(pool, zero):
    p = Pool.__new__(Pool)
    p.__dict__.update(vars(pool), zero=zero)
    return p


# ----------------------------------------------------------------------------- distance


def test_distance_matches_hand_computation():
    z = torch.tensor([3.0, 4.0])  # ||z|| = 5
    acts = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], [[0.0, 5.0], [3.0, 3.0], [-3.0, -4.0]]])
    d, pos = distance(z, acts)
    assert torch.allclose(d, torch.tensor([0.0, 1.0 / 5])) and pos.tolist() == [0, 1]  # [3,3]: ||(0,-1)|| / 5
    d, pos = distance(z, acts, mask_BT=torch.tensor([[False, True, True], [True, False, True]]))
    assert torch.allclose(d, torch.tensor([math.sqrt(18) / 5, math.sqrt(10) / 5])) and pos.tolist() == [1, 0]  # (0,1) beats (6,8) at 1.0
    d, pos = distance(z, acts, metric="cosine")
    assert torch.allclose(d, torch.tensor([0.0, 1 - 21 / (5 * math.sqrt(18))]), atol=1e-6) and pos.tolist() == [0, 1]
    with pytest.raises(ValueError, match="metric must be one of"):
        distance(z, acts, metric="l1")
    with pytest.raises(ValueError, match="z has width 3 but the activations have width 2"):
        distance(torch.ones(3), acts)


def test_real_positions_stop_at_eos():
    ids = torch.tensor([[0, 5, 6, 0, 0], [0, 1, 2, 3, 4]])
    assert real_positions(ids, 0).tolist() == [[True, True, True, False, False], [True] * 5]
    assert real_positions(ids, None).all()


# ----------------------------------------------------------------------------- sites and training data


def test_default_sites_cover_resid_attn_mlp_and_heads(gpt2):
    names = default_sites(gpt2)
    assert names[0] == "blocks.0.hook_resid_pre" and len(names) == 1 + 2 * (4 + 3)
    assert {"blocks.1.attn.hook_z.3", "blocks.1.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"} <= set(names)


def test_head_site_is_the_slice_of_hook_z(gpt2):
    ids = inputs(2, 1)
    acts = read_sites(gpt2, ids, ["blocks.1.attn.hook_z.2", "blocks.1.attn.hook_z"])
    assert torch.equal(acts["blocks.1.attn.hook_z.2"], acts["blocks.1.attn.hook_z"][:, :, 2])
    with pytest.raises(ValueError, match="head 9 does not exist; the model has 4 heads"):
        read_sites(gpt2, ids, ["blocks.1.attn.hook_z.9"])
    with pytest.raises(ValueError, match="unknown site 'blocks.7.hook_mlp_out'"):
        read_sites(gpt2, ids, ["blocks.7.hook_mlp_out"])


def test_pair_source_takes_the_activation_at_the_chosen_site_and_position(gpt2):
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z.0", "blocks.1.hook_mlp_out"]
    src = PairSource(gpt2, names, lambda n, seed: inputs(n, seed)[:, :3])
    z, ids, site = src.batch(16, seed=3)
    acts = read_sites(gpt2, ids, names)
    assert set(site.tolist()) == {0, 1, 2} and z.shape == (16, 32)
    for b in range(16):
        a = acts[names[site[b]]][b]  # [T, D]
        hits = [t for t in range(1, 3) if torch.allclose(a[t], z[b, : a.shape[-1]])]  # never BOS by default
        assert hits and (z[b, a.shape[-1]:] == 0).all()
    z2, ids2, site2 = src.batch(16, seed=3)
    assert torch.equal(z, z2) and torch.equal(ids, ids2) and torch.equal(site, site2)


def test_sequence_loss_ignores_tokens_after_eos():
    logits = torch.randn(1, 4, 5)
    full = sequence_loss(logits, torch.tensor([[0, 1, 0, 3]]), eos_id=0)
    manual = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([1, 0]))
    assert torch.allclose(full, manual)


# ----------------------------------------------------------------------------- conditioning is used


def test_conditioned_decoder_beats_unconditioned_and_samples_differ_with_z(gpt2, trained):
    cond, uncond = trained
    fractions = []
    for dec in (cond, uncond):
        hits = [sample(dec, gpt2, SITE, query=inputs(1, 100 + q)[0], position=2, temperatures=(1.0,), n_per_temperature=16,
                       seed=q).inside_fraction for q in range(4)]  # fmt: skip
        fractions.append(float(np.mean(hits)))
    # measured: 0.97 conditioned vs 0.09 unconditioned (the right token at position 2 by chance: 1/8)
    assert fractions[0] >= 0.7 and fractions[1] <= 0.35, fractions
    za = query_activation(gpt2, torch.tensor([BOS, 1, 2]), SITE, 2)
    zb = query_activation(gpt2, torch.tensor([BOS, 1, 5]), SITE, 2)
    gen = lambda z: generate(cond, z, SITE, 32, 1.0, torch.Generator().manual_seed(0))  # noqa: E731
    a, b = gen(za), gen(zb)
    assert not torch.equal(a, b)
    assert (a[:, 2] == 2).float().mean() > 0.7 and (b[:, 2] == 5).float().mean() > 0.7


def test_sampling_is_reproducible_with_a_seed_and_sorted(gpt2, trained):
    q = inputs(1, 7)[0]
    kw = dict(query=q, position=1, temperatures=(0.5, 2.0), n_per_temperature=8, noise=0.1)
    a, b, c = sample(trained[0], gpt2, SITE, seed=5, **kw), sample(trained[0], gpt2, SITE, seed=5, **kw), sample(trained[0], gpt2, SITE, seed=6, **kw)
    assert a.tokens == b.tokens and torch.equal(a.distance, b.distance) and a.tokens != c.tokens
    assert len(a.tokens) == 16 and sorted(a.temperature.tolist()) == [0.5] * 8 + [2.0] * 8
    assert torch.all(a.distance[1:] >= a.distance[:-1]) and torch.equal(a.inside, a.distance <= 0.1)
    # re-measure one candidate by hand: min over its positions of ||f(x)_t - z|| / ||z||
    z = query_activation(gpt2, q, SITE, 1)
    acts = read_sites(gpt2, torch.tensor([a.tokens[-1]]), [SITE])[SITE][0]
    d = ((acts - z).norm(dim=-1) / z.norm()).min()
    assert torch.allclose(a.distance[-1], d, atol=1e-5)
    assert all(len(col) == len(t) and col[0] == 0 for col, t in zip(a.colour, a.tokens))


def test_colour_is_logp_given_z_minus_logp_given_bos(gpt2, trained):
    dec = trained[0]
    q = torch.tensor([BOS, 3, 4])
    out = sample(dec, gpt2, SITE, query=q, position=2, temperatures=(1.0,), n_per_temperature=4, seed=0)
    ids = torch.tensor([out.tokens[0]])
    z = query_activation(gpt2, q, SITE, 2)
    z_bos = query_activation(gpt2, torch.tensor([BOS]), SITE, 0)
    s = torch.zeros(1, dtype=torch.long)
    lp = lambda zz: dec(ids, zz[None], s).log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(out.colour[0][1:], lp(z) - lp(z_bos), atol=1e-5)


def test_bad_input_is_rejected_clearly(gpt2, trained):
    dec, q = trained[0], inputs(1, 0)[0]
    with pytest.raises(ValueError, match=r"position 3 is outside the query input of 3 tokens; allowed 0..2"):
        sample(dec, gpt2, SITE, query=q, position=3)
    with pytest.raises(ValueError, match=r"unknown site 'blocks.1.hook_mlp_out' for this decoder; it was trained on \['blocks.0.hook_resid_pre'\]"):
        sample(dec, gpt2, "blocks.1.hook_mlp_out", query=q, position=1)
    with pytest.raises(ValueError, match="z has width 40 but site .blocks.0.hook_resid_pre. has width 32"):
        sample(dec, gpt2, SITE, z=torch.ones(40))
    with pytest.raises(ValueError, match="pass either query"):
        sample(dec, gpt2, SITE)
    with pytest.raises(ValueError, match=r"temperatures must all be finite numbers > 0, got \[0.0\]"):
        sample(dec, gpt2, SITE, query=q, position=1, temperatures=(0.0,))
    with pytest.raises(ValueError, match="conditioning must be 'prefix' or 'cross'"):
        tiny_config(conditioning="film")
    with pytest.raises(ValueError, match="feature index 5 is outside 0..3"):
        feature_query(torch.randn(4, 32), 5, 1.0)


def test_feature_query_conditions_on_a_scaled_direction(gpt2, trained):
    W_dec = torch.randn(4, 32)
    z = feature_query(W_dec, 2, 3.0, b_dec_D=torch.ones(32))
    assert torch.allclose(z, 3 * W_dec[2] + 1)
    out = sample(trained[0], gpt2, SITE, z=z, temperatures=(1.0,), n_per_temperature=4, metric="cosine")
    assert len(out.tokens) == 4 and torch.isfinite(out.distance).all()


# ----------------------------------------------------------------------------- architecture options, saving, training


def test_cross_attention_option_trains_and_prefix_slot_is_seen_at_every_position():
    torch.manual_seed(0)
    ids, s = torch.tensor([[BOS, 1, 2]]), torch.zeros(1, dtype=torch.long)
    for mode in ("prefix", "cross"):
        dec = InversionDecoder(tiny_config(conditioning=mode))
        a, b = dec(ids, torch.randn(1, 32), s), dec(ids, torch.randn(1, 32), s)
        assert not torch.allclose(a[:, 0], b[:, 0])  # z reaches even the first position
        assert torch.allclose(dec(ids[:, :2], torch.ones(1, 32), s), dec(ids, torch.ones(1, 32), s)[:, :2], atol=1e-5)  # causal


def test_save_load_round_trip_is_exact(tmp_path, trained):
    dec = trained[0]
    save_decoder(dec, tmp_path, {"card": {"note": "x"}})
    back = load_decoder(tmp_path)
    assert back.cfg == dec.cfg and json.loads((tmp_path / "decoder.json").read_text())["card"]["note"] == "x"
    for (k, v), (k2, v2) in zip(dec.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    g = lambda d: generate(d, torch.ones(32), SITE, 4, 1.0, torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.equal(g(dec), g(back))
    (tmp_path / "decoder.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_decoder(tmp_path)


class Crash(Exception):
    pass


class CrashAt:
    """A pair source that dies when asked for the batch of step `at` (a run killed mid-training)."""

    def __init__(self, source, at, seed=0):
        self.source, self.crash_seed = source, seed * 1_000_003 + at
        self.sites, self.model = source.sites, source.model

    def batch(self, n, seed, **kw):
        if seed == self.crash_seed:
            raise Crash
        return self.source.batch(n, seed, **kw)

    def pairs(self, *a, **kw):  # held-out queries for the in-epsilon measurement
        return self.source.pairs(*a, **kw)


@pytest.mark.parametrize("rebalance", [0.0, 6.0])
def test_interrupted_training_resumes_to_the_same_decoder(gpt2, tmp_path, rebalance):
    src = PairSource(gpt2, [SITE, "blocks.1.hook_resid_post"], inputs)
    cfg = decoder_train_config(steps=8, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=3, checkpoint_dir=str(tmp_path))
    straight_cfg = decoder_train_config(steps=8, batch_size=8, lr=1e-3, warmup_steps=1)
    rb = RebalanceConfig(rebalance=rebalance, eval_every=2, eval_queries=2, eval_samples=2)
    cfg_d = tiny_config(sites=tuple(src.sites))
    torch.manual_seed(0)
    straight = InversionDecoder(cfg_d)
    h1 = train_decoder(straight, src, straight_cfg, rb, progress=False)
    torch.manual_seed(0)
    killed = InversionDecoder(cfg_d)
    with pytest.raises(Crash):
        train_decoder(killed, CrashAt(src, at=7), cfg, rb, progress=False)
    assert latest_checkpoint(tmp_path).name == "step_00000006"  # the last checkpoint before the crash
    torch.manual_seed(123)  # a fresh decoder: everything must come from the checkpoint
    resumed = InversionDecoder(cfg_d)
    h2 = train_decoder(resumed, src, cfg, rb, progress=False)
    for (k, v), v2 in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(v, v2, atol=1e-6), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in h]  # noqa: E731
    assert strip(h1) == strip(h2)
    evals = [r for r in h1 if "inside" in r]
    assert [r["measured_at"] for r in evals] == [0, 2, 4, 6] and all(0 <= f <= 1 for r in evals for f in r["inside"].values())
    assert all(("site_weights" in r) == (rebalance > 0) for r in evals)


def test_rebalancing_draws_sites_by_softmax_of_their_shortfall(gpt2):
    src = PairSource(gpt2, [SITE, "blocks.1.hook_resid_post"], inputs)
    cfg = decoder_train_config(steps=3, batch_size=8, lr=1e-3, warmup_steps=1)
    rb = RebalanceConfig(rebalance=6.0, eval_every=1, eval_queries=4, eval_samples=4)
    seen = []

    class Spy:
        sites, model = src.sites, src.model

        def batch(self, n, seed, **kw):
            out = src.batch(n, seed, **kw)
            if seed != 2**31 - 1:  # training batches, not the scale fit
                seen.append((kw.get("site_weights"), out[2]))
            return out

        def pairs(self, *a, **kw):
            return src.pairs(*a, **kw)

    torch.manual_seed(0)
    history = train_decoder(InversionDecoder(tiny_config(sites=tuple(src.sites))), Spy(), cfg, rb, progress=False)
    for rec, (w, site_B) in zip([r for r in history if "inside" in r], seen):
        r = torch.tensor(list(rec["inside"].values()))
        assert torch.allclose(torch.tensor(rec["site_weights"]), ((r.mean() - r) * 6.0).softmax(0), atol=1e-6)
        assert torch.equal(w, torch.tensor(rec["site_weights"]))
    # the draw follows the weights: a site of weight 0 never comes up, one of weight 1 always does
    assert set(src.batch(64, seed=1, site_weights=torch.tensor([0.0, 1.0]))[2].tolist()) == {1}
    z, _, site_B = src.batch(6, seed=1, site=0)
    assert site_B.tolist() == [0] * 6 and torch.equal(z, src.batch(6, seed=1, site_weights=torch.tensor([1.0, 0.0]))[0][:, :32])
    with pytest.raises(ValueError, match="site_weights must be 2 non-negative numbers"):
        src.batch(4, seed=0, site_weights=torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="site index 2 is outside 0..1"):
        src.batch(4, seed=0, site=2)
    with pytest.raises(ValueError, match="rebalance must be >= 0 and needs eval_every >= 1"):
        RebalanceConfig(rebalance=6.0)


def test_a_focus_site_gets_its_share_of_the_pairs_on_top_of_the_rebalancing(gpt2):
    src = PairSource(gpt2, [SITE, "blocks.0.hook_attn_out", "blocks.1.hook_resid_post"], inputs)
    cfg = decoder_train_config(steps=2, batch_size=8, lr=1e-3, warmup_steps=1)
    seen = []

    class Spy:
        sites, model = src.sites, src.model

        def batch(self, n, seed, **kw):
            seen.append(kw.get("site_weights"))
            return src.batch(n, seed, **kw)

        def pairs(self, *a, **kw):
            return src.pairs(*a, **kw)

    focus = "blocks.1.hook_resid_post"
    for rb in (RebalanceConfig(focus=focus, focus_share=0.5), RebalanceConfig(6.0, eval_every=1, eval_queries=2, eval_samples=2, focus=focus, focus_share=0.5)):
        seen.clear()
        torch.manual_seed(0)
        history = train_decoder(InversionDecoder(tiny_config(sites=tuple(src.sites))), Spy(), cfg, rb, progress=False)
        w = seen[-1]
        assert abs(float(w.sum()) - 1) < 1e-5 and float(w[2]) >= 0.5
        if rb.rebalance:  # the rebalanced part is the softmax of the shortfall, scaled by 1 - share
            r = torch.tensor(list([h for h in history if "inside" in h][-1]["inside"].values()))
            assert torch.allclose(w, 0.5 * ((r.mean() - r) * 6.0).softmax(0) + torch.tensor([0, 0, 0.5]), atol=1e-5)
        else:
            assert torch.allclose(w, torch.tensor([1 / 6, 1 / 6, 2 / 3]))
    with pytest.raises(ValueError, match="focus .a site name. and focus_share"):
        RebalanceConfig(focus=focus)
    with pytest.raises(ValueError, match="focus_share must be >= 0 and <= 1"):
        RebalanceConfig(focus=focus, focus_share=1.5)
    with pytest.raises(ValueError, match="focus site 'blocks.9.hook_mlp_out' is not one of the decoder's sites"):
        train_decoder(InversionDecoder(tiny_config(sites=tuple(src.sites))), src, cfg, RebalanceConfig(focus="blocks.9.hook_mlp_out", focus_share=0.5), progress=False)


def test_inside_fractions_is_the_in_epsilon_rate_of_fresh_samples(gpt2, trained):
    src = PairSource(gpt2, [SITE], inputs)
    cond, uncond = trained
    a = inside_fractions(cond, src, n_queries=8, n_samples=8, seed=3)
    assert a == inside_fractions(cond, src, n_queries=8, n_samples=8, seed=3) and list(a) == [SITE]
    b = inside_fractions(uncond, src, n_queries=8, n_samples=8, seed=3)
    assert a[SITE] >= 0.7 and b[SITE] <= 0.35, (a, b)  # the same gap as sample() shows above
    assert cond.training is False
    # the obvious implementation: per query, sample() at temperature 1 from the same held-out pair
    z_QD, _, _ = src.batch(8, seed=2**30 + 3, site=0)
    per_query = [sample(cond, gpt2, SITE, z=z, temperatures=(1.0,), n_per_temperature=32, seed=q).inside_fraction
                 for q, z in enumerate(z_QD)]  # fmt: skip
    assert abs(float(np.mean(per_query)) - a[SITE]) <= 0.15, (per_query, a)


def test_distance_takes_one_query_per_candidate():
    z_BD, acts = torch.randn(3, 4), torch.randn(3, 5, 4)
    for metric in ("euclidean", "cosine"):
        d, pos = distance(z_BD, acts, metric=metric)
        for b in range(3):
            d1, p1 = distance(z_BD[b], acts[b : b + 1], metric=metric)
            assert torch.allclose(d[b], d1[0]) and pos[b] == p1[0]
    with pytest.raises(ValueError, match="2 queries for 3 candidates"):
        distance(z_BD[:2], acts)


# ----------------------------------------------------------------------------- feature sites (SAE latents, codebook codes)


@pytest.fixture(scope="module")
def sae_site():
    from nbfeatures.sae.topk import TopKConfig, TopKSAE

    return FeatureSite.from_sae(TopKSAE(TopKConfig(32, 16, 1), seed=3), SITE)


def test_feature_site_restricts_the_activation_to_one_latent(gpt2, sae_site):
    ids = inputs(3, 5)
    acts = read_sites(gpt2, ids, [SITE])[SITE]
    lat = sae_site.encode(acts).detach()
    latent_B = torch.tensor([0, 7, 15])
    want = torch.stack([lat[b, :, i, None] * sae_site.W_dec_FD[i] for b, i in enumerate(latent_B.tolist())])
    assert torch.allclose(sae_site.restrict(acts, latent_B), want)
    assert torch.allclose(site_acts(gpt2, ids, sae_site, latent_B), want)
    with pytest.raises(ValueError, match="needs a latent per row"):
        site_acts(gpt2, ids, sae_site)
    bad = FeatureSite("f", SITE, lambda x: x[..., :5], sae_site.W_dec_FD)
    with pytest.raises(ValueError, match=r"encode gave shape \[3, 3, 5\].*expected \[..., 16\]"):
        bad.restrict(acts, latent_B)


def test_codebook_feature_site_is_the_chosen_code(gpt2):
    from nbfeatures.codebook import CodebookConfig, CodebookLayer

    layer = CodebookLayer(CodebookConfig(32, 10, k=1), seed=0).eval()
    site = FeatureSite.from_codebook(layer, SITE)
    acts = read_sites(gpt2, inputs(4, 2), [SITE])[SITE]
    out = layer(acts)
    chosen = out.codes[..., 0]  # [B, T]
    for t in range(acts.shape[1]):  # restricted to the chosen code, the activation is that code: the layer's output
        assert torch.allclose(site.restrict(acts, chosen[:, t])[:, t], out.quantized[:, t], atol=1e-5)
    other = (chosen[:, 1] + 1) % 10  # a code that was not chosen: restricted to it, nothing is left
    assert (site.restrict(acts, other)[:, 1] == 0).all()
    with pytest.raises(ValueError, match="single-group codebook"):
        FeatureSite.from_codebook(CodebookLayer(CodebookConfig(8, 10, n_groups=4)), SITE)


def test_pair_source_at_a_feature_site_picks_an_active_latent(gpt2, sae_site):
    src = PairSource(gpt2, [SITE, sae_site], inputs)
    assert src.names == [SITE, f"{SITE}:sae"]
    z, ids, site_B, latent_B = src.pairs(64, seed=4)
    assert set(site_B.tolist()) == {0, 1} and bool((latent_B[site_B == 0] == -1).all())
    acts = read_sites(gpt2, ids, [SITE])[SITE]
    lat = sae_site.encode(acts).detach()
    for b in (site_B == 1).nonzero()[:, 0].tolist():
        i = int(latent_B[b])
        hits = [t for t in range(1, 3) if lat[b, t, i] > 0 and torch.allclose(z[b], lat[b, t, i] * sae_site.W_dec_FD[i])]
        assert hits, b


@pytest.fixture(scope="module")
def feature_trained(gpt2, sae_site):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    src = PairSource(gpt2, [sae_site], inputs)
    pool = Pool(src)
    out = []
    for zero in (False, True):
        torch.manual_seed(0)
        dec = InversionDecoder(tiny_config(sites=(sae_site.name,)))
        train_decoder(dec, _with_zero(pool, zero), decoder_train_config(steps=100, batch_size=64, lr=1e-2, warmup_steps=10), progress=False)
        out.append(dec)
    torch.set_num_threads(threads)
    return src, out


def test_feature_conditioned_samples_make_the_latent_fire_like_the_query(gpt2, sae_site, feature_trained):
    src, (cond, uncond) = feature_trained
    a = inside_fractions(cond, src, n_queries=16, n_samples=8, seed=1)[sae_site.name]
    b = inside_fractions(uncond, src, n_queries=16, n_samples=8, seed=1)[sae_site.name]
    assert a >= 0.45 and a >= b + 0.3, (a, b)  # measured 0.66 vs 0.12
    q = inputs(1, 21)[0]
    i = strongest_latent(gpt2, q, sae_site, 2)
    out = sample(cond, gpt2, sae_site, query=q, position=2, temperatures=(1.0,), n_per_temperature=16, seed=0)
    a_q = sae_site.encode(read_sites(gpt2, q[None], [SITE])[SITE])[0, 2, i]
    lat = sae_site.encode(read_sites(gpt2, torch.tensor([out.tokens[-1]]), [SITE])[SITE])[0, :, i]
    assert torch.allclose(out.distance[-1], ((lat - a_q).abs() / a_q).min(), atol=1e-5)  # |a_i(x_t) / a - 1|, min over t
    z = query_activation(gpt2, q, sae_site, 2, latent=i)
    same = sample(cond, gpt2, sae_site, z=z, latent=i, temperatures=(1.0,), n_per_temperature=16, seed=0)
    assert same.tokens == out.tokens and same.site == sae_site.name
    with pytest.raises(ValueError, match="with z given, pass the latent"):
        sample(cond, gpt2, sae_site, z=z)
    with pytest.raises(ValueError, match="latent 99 is outside 0..15"):
        sample(cond, gpt2, sae_site, query=q, position=2, latent=99)
    silent = next(j for j in range(16) if sae_site.encode(read_sites(gpt2, q[None], [SITE])[SITE])[0, 2, j] == 0)
    with pytest.raises(ValueError, match=f"latent {silent} does not fire at position 2"):
        sample(cond, gpt2, sae_site, query=q, position=2, latent=silent)
    with pytest.raises(ValueError, match="latent is for feature sites"):
        sample(trained_like(cond), gpt2, SITE, query=q, position=2, latent=1)


def trained_like(dec):
    return InversionDecoder(tiny_config())


# ----------------------------------------------------------------------------- figures and the panel


def test_inversion_figure_and_summary():
    toks = [["<s>", "a", ":"], ["<s>", "b", ":"], ["<s>", "c", "x"]]
    fig = inversion_samples(toks, [0.01, 0.05, 0.4], [[0, 1, -1], [0, 2, 0], [0, 0, 0]], [2, 2, 1], 0.1)
    heat, bars = fig.data
    assert list(bars.x) == [0.01, 0.05, 0.4] and list(bars.marker.color)[2] != list(bars.marker.color)[0]
    assert heat.text[0] == ["&lt;s&gt;", "a", ":"] and heat.z[0][1] == 1
    assert any(s.type == "line" and s.x0 == 0.1 for s in fig.layout.shapes)
    assert shared_tokens(toks, [2, 2, 1], [True, True, False]) == [
        {"offset": 0, "token": ":", "share": 1.0, "n": 2}, {"offset": -2, "token": "<s>", "share": 1.0, "n": 2}]
    from nbfeatures.plots.inversion import QUERY_STYLE
    assert [QUERY_STYLE in s for s in query_html(["<s>", "b"], 1).split('<span class="nbf-tok')[1:]] == [False, True]
    with pytest.raises(ValueError, match="one entry per sample"):
        inversion_samples(toks, [0.1], [[0]], [0], 0.1)


@pytest.fixture(params=[True, False], ids=["FigureWidget", "static"])
def figure_mode(request, monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", request.param)


def test_panel_headless(gpt2, trained, figure_mode):
    vocab = [f"w{i}" for i in range(63)] + ["<s>"]
    encode = lambda text: [BOS] + [int(w[1:]) for w in text.split()]  # noqa: E731
    calls = []
    sample_fn, tokenize = panel_callables(trained[0], gpt2, vocab, encode, n_per_temperature=8)

    def spy(*args):
        calls.append(args)
        return sample_fn(*args)

    panel = InversionPanel(spy, tokenize, [SITE], query="w3 w4")
    assert panel.position.max == 2 and panel.position.value == 2 and not calls
    panel.sample_button.click()
    assert calls[-1] == ("w3 w4", SITE, 2, 1.0)
    bars = panel.fig.data[1]
    assert len(bars.x) == 8 and list(bars.x) == sorted(bars.x)
    assert "w4" in panel.query_view.value and "inside" in panel.status.value
    n_in = sum(x <= 0.1 for x in bars.x)
    assert f"{n_in} of 8" in panel.status.value
    panel.epsilon.value = 1.0  # redraw only: no new call
    n_in = sum(x <= 1.0 for x in bars.x)
    assert len(calls) == 1 and n_in > 0 and f"{n_in} of 8" in panel.status.value and f"shared by the {n_in}" in panel.summary.value
    assert any(s.type == "line" and s.x0 == 1.0 for s in panel.fig.layout.shapes)
    panel.position.value = 1
    assert calls[-1][2] == 1 and "position 1" in panel.query_view.value
    panel.query.value = "w5 w6"  # a new query: the position moves to its last token and samples once
    assert calls[-1] == ("w5 w6", SITE, 2, 1.0) and len(calls) == 3 and panel.position.max == 2
    # pressing Sample again with the same controls draws fresh samples (the figure changes), not a replay
    before = [list(t.text) for t in panel.fig.data if getattr(t, "text", None) is not None]
    panel.sample_button.click()
    after = [list(t.text) for t in panel.fig.data if getattr(t, "text", None) is not None]
    assert len(calls) == 4 and calls[-1] == calls[-2] and before != after
    # the draws are reproducible from the base seed
    first, _ = panel_callables(trained[0], gpt2, vocab, encode, n_per_temperature=8)
    again, _ = panel_callables(trained[0], gpt2, vocab, encode, n_per_temperature=8)
    assert [first("w3", SITE, 1, 1.0).tokens for _ in range(2)] == [again("w3", SITE, 1, 1.0).tokens for _ in range(2)]
    with pytest.raises(ValueError, match="unknown site"):
        spy("w1", "blocks.9.hook_mlp_out", 1, 1.0)
