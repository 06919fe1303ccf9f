"""The support matrix: every TransformerLens site of every architecture against raw torch hooks, read in any order.

Tiny random-init models (2 layers, width 64) built offline with AutoConfig.for_model. The oracle is independent of
nbfeatures' own table: REFERENCE below names, per architecture, the modules a raw hook reads, typed from the
models' source; what each sublayer adds is pinned by the residual stream itself (resid_mid - resid_pre, or
o_proj(z) in a parallel block). `python benchmarks/support_matrix.py` writes the README table from the same runs.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nbfeatures import sites
from nbfeatures.edits import Ablate, Splice, Steer

VOCAB, D, T = 97, 64, 7
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
GPT2 = dict(n_embd=D, n_layer=2, n_head=4, n_inner=128, n_positions=64)
# name -> (model_type, config overrides)
CONFIGS = {
    "gpt2": ("gpt2", GPT2), "gpt_bigcode": ("gpt_bigcode", GPT2), "gptj": ("gptj", {**GPT2, "rotary_dim": 8}),
    "gpt_neox": ("gpt_neox", {"use_parallel_residual": True}), "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": D}), "bloom": ("bloom", {"n_head": 4, "n_layer": 2}),
    "falcon": ("falcon", {"num_kv_heads": 4}), "falcon_new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "llama": ("llama", {"num_key_value_heads": 2}), "mistral": ("mistral", {"num_key_value_heads": 2}),
    "mixtral": ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2}),
    "qwen2_moe": ("qwen2_moe", {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 32, "mlp_only_layers": [1]}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}), "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16}), "gemma3": ("gemma3_text", {"head_dim": 16}), "phi": ("phi", {}),
    "phi3": ("phi3", {}), "olmo": ("olmo", {}), "olmo2": ("olmo2", {}), "stablelm": ("stablelm", {}),
    "stablelm_parallel": ("stablelm", {"use_parallel_residual": True}), "starcoder2": ("starcoder2", {"num_key_value_heads": 2}),
    "cohere": ("cohere", {}), "granite": ("granite", {"residual_multiplier": 0.37, "embedding_multiplier": 3.0}),
    "smollm3": ("smollm3", {"num_key_value_heads": 2}),
}  # fmt: skip

LL = ("model.layers.{i}", "model.embed_tokens", "model.norm", "input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.down_proj")
G2 = ("transformer.h.{i}", "transformer.wte", "transformer.ln_f", "ln_1", "ln_2", "attn.c_proj", "mlp.c_proj")
# name -> (block, embed, final norm, ln1, ln2 (its input is resid_mid), attention output projection, MLP down projection)
REFERENCE = {
    "gpt2": G2, "gpt_bigcode": G2, "gptj": ("transformer.h.{i}", "transformer.wte", "transformer.ln_f", "ln_1", None, "attn.out_proj", "mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers.{i}", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "input_layernorm", "post_attention_layernorm",
                 "attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers.{i}", "model.decoder.embed_tokens", "model.decoder.final_layer_norm", "self_attn_layer_norm",
            "final_layer_norm", "self_attn.out_proj", "fc2"),
    "bloom": ("transformer.h.{i}", "transformer.word_embeddings", "transformer.ln_f", "input_layernorm", "post_attention_layernorm",
              "self_attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("transformer.h.{i}", "transformer.word_embeddings", "transformer.ln_f", "input_layernorm", None, "self_attention.dense",
               "mlp.dense_4h_to_h"),
    "falcon_new": ("transformer.h.{i}", "transformer.word_embeddings", "transformer.ln_f", "ln_attn", "ln_mlp", "self_attention.dense",
                   "mlp.dense_4h_to_h"),
    "mixtral": LL[:6] + (None,), "qwen2_moe": LL, "starcoder2": LL[:6] + ("mlp.c_proj",),
    "gemma2": LL[:4] + ("pre_feedforward_layernorm",) + LL[5:], "gemma3": LL[:4] + ("pre_feedforward_layernorm",) + LL[5:],
    "phi": ("model.layers.{i}", "model.embed_tokens", "model.final_layernorm", "input_layernorm", None, "self_attn.dense", "mlp.fc2"),
    "olmo2": LL[:3] + (None, None) + LL[5:], "stablelm_parallel": LL[:4] + (None,) + LL[5:], "cohere": LL[:4] + (None,) + LL[5:],
    "gpt_neox_sequential": None,
}  # fmt: skip
REFERENCE["gpt_neox_sequential"] = REFERENCE["gpt_neox"]
PARALLEL = {"gptj", "gpt_neox", "falcon", "falcon_new", "phi", "cohere", "stablelm_parallel"}
NO_PATTERN = {"bloom", "falcon", "falcon_new"}  # attention computed inline, not through transformers' attention interface


def build(name: str):
    model_type, extra = CONFIGS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra})
        hf = AutoModelForCausalLM.from_config(cfg).eval()
    return hf


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def arch(request):
    hf = build(request.param)
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    return request.param, hf, sites.wrap(hf), ids


def raw_reads(hf, name, ids):
    """Block inputs/outputs and the REFERENCE modules' inputs/outputs, by plain torch hooks."""
    block, embed, ln_f, ln1, ln2, o_proj, down = REFERENCE.get(name, LL)
    store, handles = {}, []

    def grab(key, path, io):
        if path is None or not _has(hf, path):
            return
        mod = hf.get_submodule(path)

        def keep(value):  # hooks must return None, or they would replace the module's inputs / outputs
            value = (value[0] if isinstance(value, tuple) else value).clone()
            store.setdefault(key, value.view(len(ids), -1, value.shape[-1]) if value.dim() == 2 else value)  # OPT's MLP: [B*T, D]

        if io == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, args: keep(args)))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out: keep(out)))

    grab("hook_embed", embed, "out")
    grab("ln_final.hook_normalized", ln_f, "out")
    for i in range(2):
        b = block.format(i=i)
        grab(f"blocks.{i}.hook_resid_post", b, "out")
        grab(f"blocks.{i}.ln1.hook_normalized", ln1 and f"{b}.{ln1}", "out")
        grab(f"blocks.{i}.ln2.hook_normalized", ln2 and f"{b}.{ln2}", "out")
        grab(f"blocks.{i}.attn.hook_z", f"{b}.{o_proj}", "in")
        grab(f"blocks.{i}.mlp.hook_post", down and f"{b}.{down}", "in")
        if name not in PARALLEL:
            grab(f"blocks.{i}.hook_resid_mid", f"{b}.{ln2}" if ln2 else f"{b}.mlp", "in")
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states  # resid_pre of each block, as transformers reports it
    for h in handles:
        h.remove()
    for i in range(2):
        store[f"blocks.{i}.hook_resid_pre"] = hidden[i]
    return store


def _has(hf, path):
    try:
        hf.get_submodule(path)
        return True
    except AttributeError:
        return False


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


def test_every_site_is_exact_in_any_order(arch):
    name, hf, model, ids = arch
    names = sites.site_names(model)
    reads = [sites.read_acts(model, ids, random.Random(seed).sample(names, len(names))) for seed in range(3)]
    for other in reads[1:]:  # the order of the list never matters
        for n in names:
            assert torch.equal(reads[0][n], other[n]), n
    a, ref = reads[0], raw_reads(hf, name, ids)
    n_heads = hf.config.num_attention_heads
    for key, expected in ref.items():
        got = a[key].flatten(-2) if key.endswith("hook_z") else a[key]
        close(got, expected, f"{name} {key}")
    for i in range(2):
        b = f"blocks.{i}"
        assert a[f"{b}.attn.hook_z"].shape[-2] == n_heads
        if name in PARALLEL:  # both sublayers read resid_pre; what they add is the rest of the residual stream
            assert f"{b}.hook_resid_mid" not in names
            close(a[f"{b}.hook_resid_post"], a[f"{b}.hook_resid_pre"] + a[f"{b}.hook_attn_out"] + a[f"{b}.hook_mlp_out"], f"{name} {b} parallel sum")
            proj = hf.get_submodule(f"{REFERENCE[name][0].format(i=i)}.{REFERENCE[name][5]}")
            close(proj(a[f"{b}.attn.hook_z"].flatten(-2)), a[f"{b}.hook_attn_out"], f"{name} {b} attn_out = o_proj(z)")
        else:
            close(a[f"{b}.hook_resid_mid"], a[f"{b}.hook_resid_pre"] + a[f"{b}.hook_attn_out"], f"{name} {b} resid_mid")
            close(a[f"{b}.hook_resid_post"], a[f"{b}.hook_resid_mid"] + a[f"{b}.hook_mlp_out"], f"{name} {b} resid_post")
    torch.testing.assert_close(a["blocks.0.hook_resid_post"], a["blocks.1.hook_resid_pre"], rtol=0, atol=0)


def test_attention_patterns_equal_transformers_own_and_are_editable(arch):
    name, hf, model, ids = arch
    if name in NO_PATTERN:
        with pytest.raises(ValueError, match=r"attn.hook_pattern does not exist in .*use attn.hook_z"):
            sites.resolve(model, "blocks.0.attn.hook_pattern")
        return
    a = sites.read_acts(model, ids, ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"])
    before = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = hf(ids, output_attentions=True).attentions
    finally:
        hf.config._attn_implementation = before
    assert hf.config._attn_implementation == before  # reading patterns leaves the model's implementation as it was
    for i in range(2):
        assert a[f"blocks.{i}.attn.hook_pattern"].shape == (2, hf.config.num_attention_heads, T, T)
        close(a[f"blocks.{i}.attn.hook_pattern"], attentions[i], f"{name} pattern {i}")
    # an edit flows on: zero attention -> zero per-head outputs; the identity splice changes nothing
    out = sites.run(model, ids, [Ablate("blocks.0.attn.hook_pattern")], read=["blocks.0.attn.hook_z"])
    assert torch.count_nonzero(out.acts["blocks.0.attn.hook_z"]) == 0
    clean = sites.run(model, ids).logits
    same = sites.run(model, ids, [Splice("blocks.1.attn.hook_pattern", lambda p: p.clone())]).logits
    close(same, clean, f"{name} identity pattern splice")


def test_edits_in_any_order_and_resid_mid_edits_carry(arch):
    name, hf, model, ids = arch
    names = sites.site_names(model)
    clean = sites.run(model, ids).logits
    # every site at once, reversed (not the pattern: reading it runs attention on the eager path, equal only to 1e-8)
    zero = [Steer(n, torch.zeros(sites.read_acts(model, ids, n)[n].shape[2:])) for n in names if n.startswith("blocks.0.") and "pattern" not in n]
    torch.testing.assert_close(sites.run(model, ids, zero[::-1]).logits, clean, rtol=0, atol=0)
    v = torch.randn(D, generator=torch.Generator().manual_seed(2))
    pair = [Steer("blocks.0.hook_resid_post", v), Steer("blocks.0.hook_attn_out", 0.5 * v)]
    one, two = sites.run(model, ids, pair).logits, sites.run(model, ids, pair[::-1]).logits
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    if name not in PARALLEL:  # an edit of resid_mid reaches both the MLP and the residual stream it continues
        out = sites.run(model, ids, [Steer("blocks.0.hook_resid_mid", v)], read=["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out",
                                                                                   "blocks.0.hook_resid_post"])  # fmt: skip
        close(out.acts["blocks.0.hook_resid_post"], out.acts["blocks.0.hook_resid_mid"] + out.acts["blocks.0.hook_mlp_out"], f"{name} carry")
        assert not torch.allclose(out.logits, clean)


def test_sites_an_architecture_lacks_are_absent_and_refused(arch):
    name, hf, model, ids = arch
    names = set(sites.site_names(model))
    expected_absent = set()
    if name in PARALLEL:
        expected_absent.add("blocks.0.hook_resid_mid")
    if name == "mixtral" or name == "qwen2_moe":
        expected_absent.add("blocks.0.mlp.hook_post")  # qwen2_moe's layer 0 is sparse; layer 1 dense (mlp_only_layers)
    if name == "olmo2":
        expected_absent |= {"blocks.0.ln1.hook_normalized", "blocks.0.ln2.hook_normalized"}
    for site in expected_absent:
        assert site not in names
        with pytest.raises(ValueError, match=rf"{site.split('.', 2)[-1].replace('.', '[.]')} does not exist in {CONFIGS[name][0]}: .*use"):
            sites.resolve(model, site)
    if name == "qwen2_moe":
        assert "blocks.1.mlp.hook_post" in names


# ----------------------------------------------------------------------------- TransformerLens models


@pytest.fixture(scope="module")
def tl_model():
    from conftest import word_tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=32, d_head=16, n_heads=4, d_vocab=VOCAB, act_fn="gelu",
                                      normalization_type="LN")  # fmt: skip
        tl = HookedTransformer(cfg).eval()
    return tl, sites.wrap(tl, tokenizer=word_tokenizer(VOCAB))


def test_transformerlens_hook_names_equal_its_own_cache(tl_model):
    tl, model = tl_model
    names = sites.site_names(model)
    assert {"hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_mid", "ln_final.hook_normalized"} <= set(names)
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)
    for seed in range(2):
        got = sites.read_acts(model, ids, random.Random(seed).sample(names, len(names)))
        for n in names:
            torch.testing.assert_close(got[n], cache[n], rtol=0, atol=0, msg=n)
    v = torch.randn(D)
    out = sites.run(model, ids, [Steer("blocks.0.hook_resid_post", v, positions=-1)]).logits
    ref = tl.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: torch.cat([x[:, :-1], x[:, -1:] + v], 1))])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_transformerlens_generate_is_greedy_with_edits(tl_model):
    tl, model = tl_model
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    v = torch.randn(D) * 3
    out = sites.generate(model, ids, [Steer("blocks.1.hook_resid_post", v, positions=slice(-1, None))], max_new_tokens=4,
                         read=["blocks.0.hook_resid_pre"])  # fmt: skip
    seq = ids
    hook = ("blocks.1.hook_resid_post", lambda x, hook: torch.cat([x[:, :4], x[:, 4:] + v], 1))
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, tl.run_with_hooks(seq, fwd_hooks=[hook])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, seq) and out.prompt_len == 5
    assert out.acts["blocks.0.hook_resid_pre"].shape == (1, 8, D)
    with pytest.raises(ValueError, match="runs past the model's context of 32"):
        sites.generate(model, ids, max_new_tokens=40)


def test_an_unknown_model_type_resolves_by_structure_or_says_what_is_missing():
    hf = build("llama")
    hf.config.model_type = "my_llama_finetune"  # not in the table: the module tree is recognised
    model = sites.wrap(hf)
    ids = torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
    got = sites.read_acts(model, ids, ["blocks.1.attn.hook_z", "blocks.1.hook_resid_mid"])
    ref = raw_reads(hf, "llama", ids)
    close(got["blocks.1.attn.hook_z"].flatten(-2), ref["blocks.1.attn.hook_z"], "z by structure")
    close(got["blocks.1.hook_resid_mid"], ref["blocks.1.hook_resid_mid"], "resid_mid by structure")

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.stack[0](x)

    with pytest.raises(ValueError, match=r"Odd is not in the site table and no known layout was found in it .*model.layers"):
        sites.resolve(Odd(), "blocks.0.hook_resid_post")
    assert sites.resolve(Odd(), "stack.0").module == "stack.0"  # module paths always work


def test_readme_support_matrix_is_current():
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("support_matrix", root / "dev" / "support_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    readme = (root / "README.md").read_text()
    shown = readme[readme.index(matrix.BEGIN) + len(matrix.BEGIN): readme.index(matrix.END)].strip()
    assert shown == matrix.table(), "the README's support matrix is stale: run `python dev/support_matrix.py`"
