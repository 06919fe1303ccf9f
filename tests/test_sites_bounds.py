"""The site layer under other dtypes and at its limits: exact error terms in bf16/fp16, modules of another dtype,
bf16 harvests on disk, and bad input (too long, out of vocabulary, empty, NaN edits) refused by name."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_hf, word_tokenizer
from nbfeatures import harvest, sites
from nbfeatures.edits import Splice, Steer
from nbfeatures.sae import TopKConfig, TopKSAE

SITE = "blocks.1.hook_resid_post"


def wrapped(arch: str, dtype=torch.float32):
    return sites.wrap(tiny_hf(arch).to(dtype), word_tokenizer())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_error_term_is_bit_exact_in_half_precision_and_casts_the_module(arch, dtype):
    model = wrapped(arch, dtype)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    sae = TopKSAE(TopKConfig(32, 64, 4))  # float32, in a half-precision model
    clean = sites.run(model, ids).logits
    out = sites.run(model, ids, [Splice(SITE, sae, error_term=True)])
    assert out.logits.dtype == dtype and torch.equal(out.logits, clean)
    assert out.outputs[SITE].latents.shape == (2, 9, 64) and out.outputs[SITE].latents.dtype == torch.float32
    spliced = sites.run(model, ids, [Splice(SITE, sae)])  # no error term: the SAE's reconstruction, cast back
    assert spliced.logits.dtype == dtype and not torch.equal(spliced.logits, clean)
    gen = sites.generate(model, ids[:1], [Splice(SITE, sae, error_term=True)], max_new_tokens=3)
    assert torch.equal(gen.tokens, sites.generate(model, ids[:1], max_new_tokens=3).tokens)


def test_bf16_harvest_to_a_folder(tmp_path):
    model = wrapped("gpt2", torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(1))
    mem = harvest(model, tokens, SITE, dtype=torch.bfloat16, progress=False)[SITE]
    disk = harvest(model, tokens, SITE, dtype=torch.bfloat16, folder=tmp_path / "h", progress=False)[SITE]
    rows = disk[:]
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, mem)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_inputs_outside_the_model_are_refused_by_name(arch):
    model = wrapped(arch)
    vocab, context = sites.limits(model)
    assert vocab == VOCAB and context is not None
    with pytest.raises(ValueError, match=rf"token id {VOCAB} is outside the vocabulary: allowed are 0..{VOCAB - 1}"):
        sites.run(model, torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary"):
        sites.read_acts(model, torch.tensor([[1, -1]]), SITE)
    with pytest.raises(ValueError, match=rf"the input has {context + 1} tokens, more than the model's context of {context}"):
        sites.run(model, torch.zeros(1, context + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="the input is empty"):
        sites.run(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"runs past the model's context of {context}; allowed are at most {context - 3} new tokens"):
        sites.generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=context)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        sites.generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=0)


class Broken(torch.nn.Module):
    """A spliced module whose output is NaN at one token."""

    def forward(self, x):
        out = x.clone()
        out[0, 0, 0] = float("nan")
        return out


@pytest.mark.parametrize("error_term", [False, True])
def test_non_finite_edits_are_refused_naming_the_edit(error_term):
    model = wrapped("gpt2")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=rf"site {SITE}: the spliced Broken returned NaN or inf"):
        sites.run(model, ids, [Splice(SITE, Broken(), error_term=error_term)])
    with pytest.raises(ValueError, match=rf"site {SITE}: the spliced Broken returned NaN or inf"):
        sites.generate(model, ids, [Splice(SITE, Broken(), error_term=error_term)], max_new_tokens=2)
    with pytest.raises(ValueError, match="the steering vector contains NaN or inf"):
        Steer(SITE, torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="coef must be a finite number"):
        Steer(SITE, torch.ones(32), coef=float("inf"))
    huge = Splice(SITE, lambda x: x * 3e38)  # finite itself, inf once the model adds to it
    with pytest.raises(ValueError, match=r"non-finite values"):
        sites.run(model, ids, [huge], read=["blocks.1.hook_resid_post", "ln_final.hook_normalized"])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_generate_and_harvest_take_sites_in_any_order(arch):
    model = wrapped(arch)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    v = torch.randn(32, generator=torch.Generator().manual_seed(4))
    edits = [Steer("blocks.0.hook_resid_post", v, positions=slice(-1, None)), Steer("blocks.0.hook_mlp_out", v, positions=slice(-1, None))]
    reads = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    a = sites.generate(model, ids, edits, max_new_tokens=3, read=reads)
    b = sites.generate(model, ids, edits[::-1], max_new_tokens=3, read=reads[::-1])
    assert torch.equal(a.tokens, b.tokens) and all(torch.equal(a.acts[n], b.acts[n]) for n in reads)
    tokens = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))
    h1, h2 = harvest(model, tokens, reads, progress=False), harvest(model, tokens, reads[::-1], progress=False)
    assert all(torch.equal(h1[n], h2[n]) for n in reads)
