"""Codebooks inserted through the site layer: enable/disable, forcing and blocking codes, finetuning, files."""

import pytest
import torch

from conftest import VOCAB
from nbfeatures import sites
from nbfeatures.codebook import CodebookConfig, CodebookLayer
from nbfeatures.codebook import BlockCodes, CodebookModel, CodebookObjective, CodebookTrainConfig, ForceCodes, PatchCodes, load_codebook_model
from nbfeatures.harvest import TokenSource
from nbfeatures.train import TrainConfig, train_sae

MLP, HEADS = "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"


@pytest.fixture
def cb(model):
    return CodebookModel(model, {MLP: CodebookLayer(CodebookConfig(32, 40, k=1)),
                                 HEADS: CodebookLayer(CodebookConfig(8, 20, k=2, n_groups=4))})


def test_enabled_codebooks_change_the_output_and_disabled_ones_do_not(cb, hf_model, ids):
    clean = hf_model(ids).logits
    on = cb.run(ids)
    assert (on.logits - clean).abs().max() > 1e-3
    assert on.outputs[MLP].codes.shape == (3, 10, 1) and on.outputs[HEADS].codes.shape == (3, 10, 4, 2)
    cb.enabled = False
    torch.testing.assert_close(cb.run(ids).logits, clean, rtol=0, atol=0)


def test_run_equals_quantising_by_hand(cb, model, ids):
    """The MLP output replaced by its nearest code, through a plain splice of the layer alone."""
    layer = cb.layer(MLP)
    acts = sites.read_acts(model, ids, MLP)[MLP]
    out = cb.run(ids)
    expected = layer(acts).codes
    assert torch.equal(out.outputs[MLP].codes, expected)
    torch.testing.assert_close(out.outputs[MLP].x_hat, layer.codebook[0][expected[..., 0]])


def test_forced_codes_persist_across_generated_tokens(cb, ids):
    force = ForceCodes(MLP, cb.layer(MLP), codes=(7,))
    out = cb.generate(ids, [force], max_new_tokens=5, min_new_tokens=5)
    assert len(out.outputs) == 5
    for step in out.outputs:  # the prompt pass and every generated token
        assert (step[MLP].codes == 7).all()
        assert step[HEADS].codes.shape[-2:] == (4, 2)  # the other codebook still runs
    natural = cb.generate(ids, max_new_tokens=5, min_new_tokens=5)
    assert not torch.equal(natural.tokens, out.tokens) or not (natural.outputs[0][MLP].codes == 7).all()


def test_forcing_at_positions_and_the_lowest_slot_of_one_head(cb, ids):
    heads = cb.layer(HEADS)
    natural = cb.run(ids).outputs[HEADS].codes
    out = cb.run(ids, [ForceCodes(HEADS, heads, codes=(3,), positions=[2, -1], mode="last", group=1)]).outputs[HEADS].codes
    changed = (out != natural).any(-1).any(-1)  # [B, T]
    assert not changed[:, [0, 1, 3, 4, 5, 6, 7, 8]].any()
    assert (out[:, [2, 9], 1, 1] == 3).all()  # head 1, lowest-ranked slot
    assert torch.equal(out[:, [2, 9], 1, 0], natural[:, [2, 9], 1, 0])  # its top slot untouched
    assert torch.equal(out[:, :, [0, 2, 3]], natural[:, :, [0, 2, 3]])  # other heads untouched


def test_forcing_all_k_slots_of_every_head(cb, ids):
    heads = cb.layer(HEADS)
    natural = cb.run(ids).outputs[HEADS].codes
    out = cb.run(ids, [ForceCodes(HEADS, heads, codes=(5, 6), positions=[3])])
    assert (out.outputs[HEADS].codes[:, 3, :, 0] == 5).all() and (out.outputs[HEADS].codes[:, 3, :, 1] == 6).all()
    assert torch.equal(out.outputs[HEADS].codes[:, :3], natural[:, :3])
    # the model saw the sum of codes 5 and 6 of each head there (read the site as the model saw it)
    seen = cb.run(ids, [ForceCodes(HEADS, heads, codes=(5, 6), positions=[3])], read=[HEADS]).acts[HEADS]
    torch.testing.assert_close(seen[:, 3], (heads.codebook[:, 5] + heads.codebook[:, 6]).expand(len(ids), -1, -1))


def test_forced_codes_from_a_position_on_persist_through_generation(cb, ids):
    force = ForceCodes(MLP, cb.layer(MLP), codes=(11,), positions=slice(-1, None))
    out = cb.generate(ids, [force], max_new_tokens=4, min_new_tokens=4)
    prompt = out.outputs[0][MLP].codes
    assert (prompt[:, -1] == 11).all() and not (prompt[:, :-1] == 11).all()
    assert all((step[MLP].codes == 11).all() for step in out.outputs[1:])


def test_patching_gives_each_row_its_own_codes(cb, ids):
    heads, mlp = cb.layer(HEADS), cb.layer(MLP)
    donor = cb.run(ids.flip(0)).outputs  # row b takes the codes row B-1-b chose at the last position
    patches = [PatchCodes(MLP, mlp, donor[MLP].codes[:, -1], positions=[-1]),
               PatchCodes(HEADS, heads, donor[HEADS].codes[:, -1], positions=[-1])]
    out = cb.run(ids, patches).outputs
    natural = cb.run(ids).outputs
    assert torch.equal(out[MLP].codes[:, -1], donor[MLP].codes[:, -1]) and torch.equal(out[HEADS].codes[:, -1], donor[HEADS].codes[:, -1])
    assert torch.equal(out[MLP].codes[:, :-1], natural[MLP].codes[:, :-1])
    with pytest.raises(ValueError, match=r"codes must be an integer tensor \[B, 4, 2\]"):
        PatchCodes(HEADS, heads, donor[HEADS].codes[:, -1, 0])
    with pytest.raises(ValueError, match=r"2 rows of codes for a batch of 3"):
        cb.run(ids, [PatchCodes(MLP, mlp, donor[MLP].codes[:2, -1])])


def test_blocked_codes_are_never_chosen(cb, ids):
    layer = cb.layer(MLP)
    natural = cb.run(ids).outputs[MLP].codes
    common = natural.flatten().mode().values.item()
    out = cb.run(ids, [BlockCodes(MLP, layer, codes=(common,))]).outputs[MLP].codes
    assert (natural == common).any() and not (out == common).any()


def test_finetuning_lowers_the_loss_with_separate_learning_rates(cb, tmp_path):
    tokens = torch.randint(0, VOCAB - 1, (64, 12), generator=torch.Generator().manual_seed(0))
    source = TokenSource(tokens, batch_size=8)
    obj = CodebookObjective(cb)
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    with torch.no_grad():
        loss0 = obj(tokens[:16])[0].item()
    hist = train_sae(cb, source, TrainConfig(steps=40, batch_size=8, lr=3e-3, log_every=10, checkpoint_dir=str(tmp_path / "ck"),
                                            checkpoint_every=20), objective=obj, progress=False)
    with torch.no_grad():
        loss1 = obj(tokens[:16])[0].item()
    assert loss1 < loss0
    after = cb.state_dict()
    moved = {k: (after[k] - before[k]).abs().max().item() for k in before}
    assert max(v for k, v in moved.items() if k.startswith("codebooks.")) > 0
    assert max(v for k, v in moved.items() if k.startswith("model.")) > 0
    assert {"ce", "codebook_mse", f"codes_used/{MLP}"} <= set(hist.columns)
    # checkpoints hold the model's weights too, so finetuning resumes
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ck" / "step_00000040" / "dictionary.safetensors"))
    assert any(k.startswith("model.") for k in saved) and any(k.startswith("codebooks.") for k in saved)


def test_param_groups_scale_the_model_lr(cb):
    groups = CodebookObjective(cb).param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert len(CodebookObjective(cb, CodebookTrainConfig(model_lr_factor=0.0)).param_groups(1e-3)) == 1


def test_save_and_load_round_trip(cb, ids, tmp_path):
    cb.save(tmp_path, base_model="tiny")
    loaded = load_codebook_model(tmp_path)
    assert loaded.sites == cb.sites
    torch.testing.assert_close(loaded.run(ids).logits, cb.run(ids).logits, rtol=0, atol=0)


def test_a_corrupt_or_foreign_codebook_file_fails_clearly(cb, tmp_path):
    from nbfeatures._io import load_tensors, save_tensors

    cb.save(tmp_path, base_model="tiny")
    tensors = load_tensors(tmp_path / "codebooks.safetensors")
    save_tensors(tmp_path / "codebooks.safetensors", {**tensors, MLP: tensors[MLP][:, :3]})
    with pytest.raises(ValueError, match=rf"codebook for {MLP} missing or of shape \[1, 3, 32\], expected \[1, 40, 32\]"):
        load_codebook_model(tmp_path)
    save_tensors(tmp_path / "codebooks.safetensors", {k: v for k, v in tensors.items() if k != MLP})
    with pytest.raises(ValueError, match=rf"codebook for {MLP} missing or of shape \[0\]"):
        load_codebook_model(tmp_path)


def test_bad_input(cb, model):
    with pytest.raises(ValueError, match=r"mode 'all' with k=2 takes exactly k codes, got 1"):
        ForceCodes(HEADS, cb.layer(HEADS), codes=(1,))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 40\)"):
        ForceCodes(MLP, cb.layer(MLP), codes=(40,))
    with pytest.raises(ValueError, match="no codebook at"):
        cb.run(torch.zeros(1, 3, dtype=torch.long), [ForceCodes("blocks.1.hook_mlp_out", cb.layer(MLP), codes=(1,))])
    with pytest.raises(ValueError, match="unknown site"):
        CodebookModel(model, {"blocks.9.hook_mlp_out": CodebookLayer(CodebookConfig(32, 4))})
