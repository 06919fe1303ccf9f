"""Shared fixtures: tiny randomly initialised models of each supported architecture (no download)."""

import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB = 64
BOS = VOCAB - 1


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0..w{V-2} plus one special token, built locally."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<s>": vocab_size - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>", pad_token="<s>", unk_token="<s>")


def tiny_hf(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    special = dict(bos_token_id=BOS, eos_token_id=BOS, pad_token_id=BOS)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, **special))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, **special))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, **special))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["gpt2", "gpt_neox", "llama"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def hf_model(arch):
    return tiny_hf(arch)


@pytest.fixture
def model(hf_model):
    from nbfeatures import sites

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sites.wrap(hf_model, tokenizer=word_tokenizer())


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a loaded
    two-core machine two threads made the SAE training tests many times (up to 30x) slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
