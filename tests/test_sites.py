"""The site layer against raw torch forward hooks, on random GPT-2, GPT-NeoX and Llama configs."""

import pathlib
import warnings
from typing import NamedTuple

import pytest
import torch
from torch import nn

from conftest import BOS, VOCAB, tiny_hf, word_tokenizer
from nbfeatures import sites, zoo
from nbfeatures.edits import Ablate, Splice, Steer

# An independent table of where each TransformerLens site lives: (module path, "in" | "out").
REFERENCE = {
    "gpt2": ("transformer.h.{i}", "attn", "attn.c_proj", "mlp", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers.{i}", "attention", "attention.dense", "mlp", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers.{i}", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "model.norm"),
}


def reference_location(arch, name):
    block, attn, attn_proj, mlp, mlp_proj, ln_f = REFERENCE[arch]
    if name == "ln_final.hook_normalized":
        return ln_f, "out"
    i, hook = name.split(".", 2)[1:]
    b = block.format(i=i)
    return {
        "hook_resid_pre": (b, "in"), "hook_resid_post": (b, "out"), "hook_attn_out": (f"{b}.{attn}", "out"),
        "hook_mlp_out": (f"{b}.{mlp}", "out"), "attn.hook_z": (f"{b}.{attn_proj}", "in"), "mlp.hook_post": (f"{b}.{mlp_proj}", "in"),
    }[hook]


class HookRun:
    """The obvious implementation: register torch hooks, run the HF module, remove them."""

    def __init__(self, module):
        self.module, self.handles, self.store = module, [], {}

    def capture(self, key, path, io):
        sub = self.module.get_submodule(path)
        if io == "in":
            self.handles.append(sub.register_forward_pre_hook(lambda m, args: self.store.__setitem__(key, args[0].detach().clone())))
        else:
            self.handles.append(sub.register_forward_hook(
                lambda m, a, out: self.store.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach().clone())))

    def modify(self, path, fn):
        def hook(m, a, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)
        self.handles.append(self.module.get_submodule(path).register_forward_hook(hook))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def block_path(arch, i):
    return REFERENCE[arch][0].format(i=i)


# ----------------------------------------------------------------------------- reading


OLD_HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z", "mlp.hook_post")


def test_read_acts_matches_hooks_at_every_site(arch, model, hf_model, ids):
    names = [n for n in sites.site_names(model) if n == "ln_final.hook_normalized" or n.split(".", 2)[-1] in OLD_HOOKS]
    assert len(names) == 2 * 6 + 1
    acts = sites.read_acts(model, ids, names)
    with HookRun(hf_model) as ref:
        for name in names:
            ref.capture(name, *reference_location(arch, name))
        hf_model(ids)
    n_heads = 4
    for name in names:
        expected = ref.store[name]
        if name.endswith("hook_z"):
            expected = expected.unflatten(-1, (n_heads, -1))
        assert acts[name].shape == expected.shape, name
        torch.testing.assert_close(acts[name], expected, rtol=0, atol=0, msg=name)


def test_sites_mean_what_transformerlens_means(arch, model, ids):
    """Semantic identities, independent of any module table."""
    names = sites.site_names(model)
    a = sites.read_acts(model, ids, names)
    hf = sites.unwrap(model)
    for i in range(2):
        b = f"blocks.{i}"
        # the residual stream adds the attention and MLP outputs (sequential or parallel residual alike)
        torch.testing.assert_close(a[f"{b}.hook_resid_post"], a[f"{b}.hook_resid_pre"] + a[f"{b}.hook_attn_out"] + a[f"{b}.hook_mlp_out"], atol=1e-5, rtol=1e-5)
        _, _, attn_proj, _, mlp_proj, _ = REFERENCE[arch]
        proj = hf.get_submodule(f"{block_path(arch, i)}.{attn_proj}")
        torch.testing.assert_close(proj(a[f"{b}.attn.hook_z"].flatten(-2)), a[f"{b}.hook_attn_out"], atol=1e-5, rtol=1e-5)
        down = hf.get_submodule(f"{block_path(arch, i)}.{mlp_proj}")
        torch.testing.assert_close(down(a[f"{b}.mlp.hook_post"]), a[f"{b}.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"], rtol=0, atol=0)


def test_raw_module_path_equals_transformerlens_name(arch, model, ids):
    path = block_path(arch, 0)
    acts = sites.read_acts(model, ids, [path, "blocks.0.hook_resid_post"])
    torch.testing.assert_close(acts[path], acts["blocks.0.hook_resid_post"], rtol=0, atol=0)


def test_read_acts_stops_after_the_deepest_site(arch, model, hf_model, ids):
    calls = []
    handles = [hf_model.get_submodule(block_path(arch, 1)).register_forward_hook(lambda *a: calls.append("block1")),
               hf_model.lm_head.register_forward_hook(lambda *a: calls.append("head"))]
    try:
        sites.read_acts(model, ids, ["blocks.0.hook_mlp_out", "blocks.0.attn.hook_z"])
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_read_acts_accepts_text(model):
    acts = sites.read_acts(model, ["w1 w2 w3", "w4 w5"], "blocks.0.hook_resid_post")
    assert acts["blocks.0.hook_resid_post"].shape == (2, 3, 32)


# ----------------------------------------------------------------------------- editing


def test_zero_steering_equals_clean_logits(model, hf_model, ids):
    out = sites.run(model, ids, [Steer("blocks.0.hook_resid_post", torch.zeros(32), coef=5.0)])
    torch.testing.assert_close(out.logits, hf_model(ids).logits, rtol=0, atol=0)


def test_steering_at_positions_equals_hook(arch, model, hf_model, ids):
    v = torch.randn(32)
    out = sites.run(model, ids, [Steer("blocks.0.hook_resid_post", v, coef=3.0, positions=[1, -1])])

    def add(x):
        x = x.clone()
        x[:, [1, x.shape[1] - 1]] += 3.0 * v
        return x

    with HookRun(hf_model) as ref:
        ref.modify(block_path(arch, 0), add)
        expected = hf_model(ids).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, hf_model(ids).logits)


def test_per_head_steering_equals_hook(arch, model, hf_model, ids):
    v = torch.zeros(4, 8)
    v[2] = torch.randn(8) * 5  # head 2 only
    out = sites.run(model, ids, [Steer("blocks.1.attn.hook_z", v)])
    proj = f"{block_path(arch, 1)}.{REFERENCE[arch][2]}"
    handle = hf_model.get_submodule(proj).register_forward_pre_hook(lambda m, args: (args[0] + v.flatten(),))
    try:
        expected = hf_model(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


class DictOut(NamedTuple):
    x_hat: torch.Tensor
    latents: torch.Tensor


class Halver(nn.Module):
    """A lossy 'dictionary': x_hat = W x with W = 0.5 I + noise, returning a NamedTuple like the SAEs."""

    def __init__(self, d):
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.eye(d) + 0.01 * torch.randn(d, d))

    def forward(self, x):
        return DictOut(x @ self.W, torch.relu(x))


def test_identity_splice_equals_clean_logits(model, hf_model, ids):
    out = sites.run(model, ids, [Splice("blocks.0.hook_mlp_out", nn.Identity()), Splice("blocks.1.attn.hook_z", lambda z: z)])
    torch.testing.assert_close(out.logits, hf_model(ids).logits, rtol=0, atol=0)


def test_error_term_keeps_logits_exact_and_exposes_latents(model, hf_model, ids):
    clean = hf_model(ids).logits
    halver = Halver(32)
    lossy = sites.run(model, ids, [Splice("blocks.0.hook_resid_post", halver)])
    exact = sites.run(model, ids, [Splice("blocks.0.hook_resid_post", halver, error_term=True)], read=["blocks.0.hook_resid_post"])
    assert (lossy.logits - clean).abs().max() > 1e-2
    torch.testing.assert_close(exact.logits, clean, atol=1e-5, rtol=1e-5)
    latents = exact.outputs["blocks.0.hook_resid_post"].latents
    assert latents.shape == (3, 10, 32) and (latents >= 0).all()


def test_splice_equals_hook_and_gradients_reach_the_module(arch, model, hf_model, ids):
    halver = Halver(32)
    out = sites.run(model, ids, [Splice("blocks.0.hook_mlp_out", halver)])
    out.logits.logsumexp(-1).mean().backward()
    grad = halver.W.grad.clone()
    halver.W.grad = None
    with HookRun(hf_model) as ref:
        ref.modify(f"{block_path(arch, 0)}.mlp", lambda x: halver(x).x_hat)
        expected = hf_model(ids).logits
    expected.logsumexp(-1).mean().backward()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, halver.W.grad, atol=1e-6, rtol=1e-4)


def test_gradients_reach_spliced_module_through_error_term(model, ids):
    halver = Halver(32)
    sites.run(model, ids, [Splice("blocks.0.hook_resid_post", halver, error_term=True)]).logits.sum().backward()
    assert halver.W.grad is not None and halver.W.grad.abs().sum() > 0


def test_zero_and_mean_ablation_equal_hook(arch, model, hf_model, ids):
    mean = torch.randn(32)
    out = sites.run(model, ids, [Ablate("blocks.0.hook_attn_out", positions=slice(2, 5)),
                                 Ablate("blocks.1.hook_mlp_out", how="mean", mean=mean, positions=-1)])

    def zero(x):
        x = x.clone()
        x[:, 2:5] = 0
        return x

    def to_mean(x):
        x = x.clone()
        x[:, -1] = mean
        return x

    with HookRun(hf_model) as ref:
        ref.modify(f"{block_path(arch, 0)}.{REFERENCE[arch][1]}", zero)
        ref.modify(f"{block_path(arch, 1)}.mlp", to_mean)
        expected = hf_model(ids).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_reads_see_the_edited_activation(model, ids):
    v = torch.randn(32)
    clean = sites.read_acts(model, ids, "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    out = sites.run(model, ids, [Steer("blocks.0.hook_resid_post", v)], read=["blocks.0.hook_resid_post"])
    torch.testing.assert_close(out.acts["blocks.0.hook_resid_post"], clean + v, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- generation


def hook_generate(hf_model, ids, path, vector, n):
    with HookRun(hf_model) as ref:
        ref.modify(path, lambda x: x + vector)
        return hf_model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=BOS)


def test_steering_during_generation_changes_every_generated_position(arch, model, hf_model, ids):
    v = torch.randn(32) * 20
    n = 6
    clean = sites.generate(model, ids, [Steer("blocks.0.hook_resid_post", torch.zeros(32))], max_new_tokens=n,
                           read=["blocks.1.hook_resid_post"], min_new_tokens=n)
    steered = sites.generate(model, ids, [Steer("blocks.0.hook_resid_post", v)], max_new_tokens=n,
                             read=["blocks.1.hook_resid_post"], min_new_tokens=n)
    T = ids.shape[1]
    assert steered.tokens.shape == (3, T + n) and steered.prompt_len == T
    a_clean, a_steer = clean.acts["blocks.1.hook_resid_post"], steered.acts["blocks.1.hook_resid_post"]
    assert a_steer.shape == (3, T + n - 1, 32)
    # every position the model ran on, prompt and each generated token, saw the steer
    diff = (a_steer - a_clean).norm(dim=-1)
    assert (diff > 1.0).all(), diff
    # and the tokens are those of a hook that steers every forward pass
    expected = hook_generate(hf_model, ids, block_path(arch, 0), v, n)
    assert torch.equal(steered.tokens, expected)
    # zero steering is the clean generation
    assert torch.equal(clean.tokens, hf_model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=BOS))


def test_generation_positions_open_slice_steers_from_last_prompt_token_on(model, ids):
    v = torch.randn(32) * 20
    n = 4
    kw = dict(max_new_tokens=n, min_new_tokens=n, read=["blocks.0.hook_resid_post"])
    clean = sites.generate(model, ids, [Steer("blocks.0.hook_resid_post", 0 * v)], **kw).acts["blocks.0.hook_resid_post"]
    steered = sites.generate(model, ids, [Steer("blocks.0.hook_resid_post", v, positions=slice(-1, None))], **kw).acts["blocks.0.hook_resid_post"]
    changed = (steered - clean).norm(dim=-1).gt(1e-4).all(dim=0)
    T = ids.shape[1]
    assert changed.tolist() == [False] * (T - 1) + [True] * n


def test_splice_during_generation_matches_hook(arch, model, hf_model, ids):
    halver = Halver(32)
    with torch.no_grad():
        out = sites.generate(model, ids, [Splice("blocks.0.hook_mlp_out", halver)], max_new_tokens=5)
        with HookRun(hf_model) as ref:
            ref.modify(f"{block_path(arch, 0)}.mlp", lambda x: halver(x).x_hat)
            expected = hf_model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=BOS)
    assert torch.equal(out.tokens, expected)


def test_generate_from_text_without_edits(model):
    out = sites.generate(model, "w1 w2 w3", max_new_tokens=3)
    assert out.tokens.shape == (1, 6) and out.tokens[0, :3].tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- other models


class TupleBlock(nn.Module):
    """Returns a tuple, as transformers 4.x decoder blocks do."""

    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return (x + self.mlp(x), None)


class TinyModel(nn.Module):
    def __init__(self, vocab=VOCAB, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([TupleBlock(d), TupleBlock(d)])
        self.unembed = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)[0]
        return self.unembed(x)


def test_plain_torch_module_with_tuple_outputs(ids):
    torch.manual_seed(0)
    tiny = TinyModel().eval()
    model = sites.wrap(tiny)
    acts = sites.read_acts(model, ids, ["blocks.0", "blocks.1.mlp"])
    x = tiny.embed(ids)
    h0 = tiny.blocks[0](x)[0]
    torch.testing.assert_close(acts["blocks.0"], h0)
    torch.testing.assert_close(acts["blocks.1.mlp"], tiny.blocks[1].mlp(h0))
    v = torch.randn(16)
    out = sites.run(model, ids, [Steer("blocks.0", v)])
    h1 = tiny.blocks[1](h0 + v)[0]
    torch.testing.assert_close(out.logits, tiny.unembed(h1), atol=1e-5, rtol=1e-5)
    assert sites.site_names(model) == []
    with pytest.raises(ValueError, match="generation needs"):
        sites.generate(model, ids)


def test_wrap_local_folder(tmp_path, ids):
    tiny_hf("gpt_neox").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = zoo.wrap(str(tmp_path))
    with pytest.raises(ValueError, match="nbf.wrap or nbf.load_model"):
        sites.wrap(str(tmp_path))
    acts = sites.read_acts(model, ids, "blocks.1.hook_resid_post")
    assert acts["blocks.1.hook_resid_post"].shape == (3, 10, 32)
    assert sites.generate(model, "w1 w2", max_new_tokens=2).tokens.shape == (1, 4)


def test_load_model_from_a_local_folder_and_unknown_names(tmp_path, ids):
    tiny_hf("llama").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = zoo.load_model(tmp_path)
    assert sites.read_acts(model, ids, "blocks.0.hook_mlp_out")["blocks.0.hook_mlp_out"].shape == (3, 10, 32)
    with pytest.raises(ValueError, match="available"):
        zoo.load_model("no-such-model")


# ----------------------------------------------------------------------------- bad input


def test_unknown_site_lists_valid_names(model, ids):
    with pytest.raises(ValueError, match=r"unknown site 'blocks\.9\.hook_resid_post'.*2 layers.*blocks\.\{0\.\.1\}\.hook_mlp_out"):
        sites.read_acts(model, ids, "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="unknown site 'not.a.module'"):
        sites.run(model, ids, [Steer("not.a.module", torch.zeros(32))])


def test_wrong_replacement_shape_names_site_and_shapes(model, ids):
    with pytest.raises(ValueError, match=r"site blocks\.0\.hook_mlp_out: replacement has shape \[3, 10, 31\], expected \[3, 10, 32\]"):
        sites.run(model, ids, [Splice("blocks.0.hook_mlp_out", lambda x: x[..., :31])])
    with pytest.raises(ValueError, match="x_hat"):
        sites.run(model, ids, [Splice("blocks.0.hook_mlp_out", lambda x: "oops")])


def test_wrong_vector_size_or_device(model, ids):
    with pytest.raises(ValueError, match=r"site blocks\.0\.hook_resid_post: steering vector has shape \[31\], expected \[32\]"):
        sites.run(model, ids, [Steer("blocks.0.hook_resid_post", torch.zeros(31))])
    with pytest.raises(ValueError, match=r"steering vector is on meta but the activations are on cpu"):
        sites.run(model, ids, [Steer("blocks.0.hook_resid_post", torch.zeros(32, device="meta"))])
    with pytest.raises(ValueError, match=r"expected \[4, 8\]"):
        sites.run(model, ids, [Steer("blocks.0.attn.hook_z", torch.zeros(32))])


def test_non_finite_activations_are_reported(arch, hf_model, ids):
    with torch.no_grad():
        hf_model.get_input_embeddings().weight[ids[0, 0]] = float("nan")
    model = sites.wrap(hf_model)
    with pytest.raises(ValueError, match=r"site blocks\.0\.hook_resid_pre: activations contain \d+ non-finite values"):
        sites.read_acts(model, ids, ["blocks.0.hook_resid_pre"])


def test_bad_inputs_and_positions(model, ids):
    with pytest.raises(ValueError, match="integer tensor"):
        sites.read_acts(model, ids.float(), "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=r"position 10 is outside the input: allowed are -10\.\.9"):
        sites.run(model, ids, [Steer("blocks.0.hook_resid_post", torch.zeros(32), positions=10)])
    with pytest.raises(ValueError, match="Ablate.how"):
        Ablate("blocks.0.hook_resid_post", how="half")
