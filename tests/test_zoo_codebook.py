"""Zoo codebook models: loadable in one call, honest cards, small folders; the training script end to end."""

import json

import pytest
import torch

from nbfeatures import zoo
from nbfeatures.codebook import CodebookModel, load_codebook_model
from nbfeatures.data import TokFSM, first_transition_accuracy
from nbfeatures.recipes.train_codebook import CODEBOOK_RECIPES, main as train_main

SHIPPED = ["tokfsm-codebook", "tokfsm-codebook-attn", "tokfsm-codebook-k4", "stories-codebook"]


def test_codebook_models_are_listed_next_to_the_base_models():
    assert set(SHIPPED) <= set(zoo.codebook_models()) and set(zoo.codebook_models()) <= set(zoo.available())
    assert {"tokfsm", "stories"} <= set(zoo.available()) and "tokfsm" not in zoo.codebook_models()
    with pytest.raises(ValueError, match=r"holds no codebooks.json: not a codebook model folder \(zoo codebook models: \[.*'tokfsm-codebook'"):
        load_codebook_model("tokfsm")
    with pytest.raises(ValueError, match="holds no codebooks.json"):
        load_codebook_model(zoo.path("tokfsm"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folder_is_small_and_its_card_names_recipe_base_and_metrics(name):
    folder = zoo.path(name)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 8 * 2**20
    ref = json.loads((folder / "codebooks.json").read_text())
    card = zoo.card(name)
    recipe = CODEBOOK_RECIPES[name]
    assert ref["base_model"] == card["base_model"] == recipe.base and recipe.base in zoo.available()
    assert card["recipe"]["k"] == recipe.k and card["recipe"]["n_codes"] == recipe.n_codes
    assert card["tokens_seen"] == card["recipe"]["steps"] * recipe.batch_size * (128 if recipe.base == "tokfsm" else 256)
    assert card["hardware"]["torch_threads"] == 1 and card["wall_time_s"] > 0
    expected_sites = recipe.sites(4)
    assert list(ref["sites"]) == expected_sites == card["sites"]
    assert all(c["k"] == recipe.k and c["n_codes"] == recipe.n_codes for c in ref["sites"].values())
    assert "val_loss" in card["metrics"] and "no_codebooks_val_loss" in card["metrics"]


def test_tokfsm_codebook_loads_in_one_call_and_matches_its_card():
    cb = load_codebook_model("tokfsm-codebook")
    assert isinstance(cb, CodebookModel) and cb.sites == CODEBOOK_RECIPES["tokfsm-codebook"].sites(4)
    assert cb.layer("blocks.0.attn.hook_z").cfg.n_groups == 4 and cb.layer("blocks.0.hook_mlp_out").cfg.k == 1
    run = lambda ids: cb.run(ids).logits  # noqa: E731
    with torch.no_grad():
        acc = first_transition_accuracy(run, TokFSM())
    # deterministic: the card was measured on the folder as written
    assert acc == pytest.approx(zoo.card("tokfsm-codebook")["metrics"]["first_transition_accuracy"], abs=0.005)
    ids = TokFSM().sample(2, seed=3)
    with torch.no_grad():
        out = cb.run(ids)
    assert out.outputs["blocks.1.attn.hook_z"].codes.shape == (2, 128, 4, 1)
    cb.enabled = False
    plain, _ = zoo.load_pretrained("tokfsm-codebook")  # the finetuned transformer alone
    torch.testing.assert_close(cb.run(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_training_script_writes_a_loadable_codebook_folder(tmp_path):
    out = tmp_path / "cb"
    train_main(["tokfsm-codebook", "--steps", "2", "--n-codes", "16", "--out", str(out), "--quick-eval", "--no-progress"])
    cb = load_codebook_model(out)
    card = json.loads((out / "card.json").read_text())
    assert card["recipe"]["steps"] == 2 and card["recipe"]["n_codes"] == 16 and card["tokens_seen"] == 2 * 32 * 128
    assert cb.sites == CODEBOOK_RECIPES["tokfsm-codebook"].sites(4) and cb.layer(cb.sites[0]).cfg.n_codes == 16
    assert "--n-codes 16" in card["command"] and all(isinstance(v, float) for v in card["metrics"].values())
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(SystemExit):
        train_main(["no-such-recipe"])
