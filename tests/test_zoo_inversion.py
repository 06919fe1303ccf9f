"""The shipped InversionView decoders and their training script (nbfeatures.recipes.train_inversion)."""

import shutil

import pytest
import torch

from nbfeatures import zoo
from nbfeatures.inversion import FeatureSite, load_decoder, site_name
from nbfeatures.recipes.train_inversion import RECIPES, TOKFSM_FEATURE_SITE, build, main, tokfsm_codebook


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_decoder_matches_its_recipe_and_card(name):
    folder = zoo.path(name) / "inversion"
    decoder = load_decoder(folder)
    _, source, _ = build(name)
    assert list(decoder.cfg.sites) == [site_name(s) for s in source.sites]
    card = zoo.card(folder)
    assert card["pairs_seen"] >= card["train_config"]["steps"] * card["train_config"]["batch_size"]
    assert card["wall_time_s_total"] > 0 and "python -m nbfeatures.recipes.train_inversion" in card["command"]


def test_tokfsm_feature_site_is_its_shipped_codebook():
    folder = zoo.path("tokfsm") / "inversion"
    _, source, _ = build("tokfsm")
    feature = source.sites[-1]
    assert isinstance(feature, FeatureSite) and feature.site == TOKFSM_FEATURE_SITE
    layer = tokfsm_codebook(None, folder)  # loads; never refits a shipped codebook (it would need the model)
    assert torch.equal(feature.W_dec_FD, layer.codebook.detach()[0])


def test_train_script_warm_starts_rebalances_and_records_it(tmp_path):
    out = tmp_path / "dec"
    main(["counting", "--init", str(zoo.path("counting") / "inversion"), "--steps", "3", "--batch-size", "8", "--rebalance", "6",
          "--eval-every", "2", "--eval-queries", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    card = zoo.card(out)
    shipped = zoo.card(zoo.path("counting") / "inversion")
    assert card["warm_start"] == shipped and card["pairs_seen"] == shipped["pairs_seen"] + 3 * 8
    assert [s for s, _ in card["inside_curve"]] == [0, 2] and [s for s, _ in card["site_weights_curve"]] == [0, 2]
    assert abs(sum(card["site_weights_curve"][0][1]) - 1) < 1e-4
    assert "--rebalance 6" in card["command"] and load_decoder(out).cfg == load_decoder(zoo.path("counting") / "inversion").cfg


def test_train_script_device_flag_reaches_the_training_and_the_card(tmp_path, monkeypatch):
    import nbfeatures.recipes.train_inversion as recipe
    from nbfeatures.sites import unwrap

    seen = {}

    def spy(decoder, source, cfg, rebalance, **kw):
        seen.update(decoder=decoder.act_scale_S.device, model=next(unwrap(source.model).parameters()).device, focus=rebalance.focus)
        return real(decoder, source, cfg, rebalance, **kw)

    real = recipe.train_decoder
    monkeypatch.setattr(recipe, "train_decoder", spy)
    out = tmp_path / "dec"
    main(["counting", "--init", str(zoo.path("counting") / "inversion"), "--steps", "2", "--batch-size", "4", "--device", "cpu",
          "--focus", "blocks.1.hook_attn_out", "--focus-share", "0.5", "--out", str(out), "--no-progress"])  # fmt: skip
    card = zoo.card(out)
    assert seen == {"decoder": torch.device("cpu"), "model": torch.device("cpu"), "focus": "blocks.1.hook_attn_out"}
    assert card["hardware"]["device"] == "cpu" and "--device cpu" in card["command"] and card["rebalance"]["focus_share"] == 0.5
    assert all(t.device.type == "cpu" for t in load_decoder(out).state_dict().values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_script_without_cuda_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["counting", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "x"), "--no-progress"])
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err


def test_train_script_fits_the_tokfsm_codebook_then_trains(tmp_path):
    out = tmp_path / "dec"
    shutil.copytree(zoo.path("tokfsm") / "inversion" / "codebook", out / "codebook")  # fitting it again takes ~10 s
    main(["tokfsm", "--steps", "2", "--out", str(out), "--no-progress"])
    assert load_decoder(out).cfg.sites[-1] == f"{TOKFSM_FEATURE_SITE}:codebook"


def test_warm_start_from_another_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="differs from recipe 'tokfsm'"):
        main(["tokfsm", "--init", str(zoo.path("counting") / "inversion"), "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress"])
