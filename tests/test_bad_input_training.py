"""Bad input to training, harvesting and the dictionaries' configs: each gets a clear error from our own `raise`.

Every case names the argument and what is allowed, and the exception must come from a `raise` inside nbfeatures
(the innermost traceback frame is in the package), not from torch or numpy. Also: an interrupted re-harvest leaves
the old harvest whole, an interrupted harvest resumes to the same shards, and a checkpoint of another data source
is refused unless resume="must".
"""

import pathlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_hf, word_tokenizer
import nbfeatures
from nbfeatures import sites
from nbfeatures.harvest import ActivationCache, ModelSource, TensorSource, TokenSource, harvest, token_batches
from nbfeatures.inversion.decoder import DecoderConfig
from nbfeatures.inversion.train import RebalanceConfig
from nbfeatures.sae.binary import BinaryAE, BinaryConfig, BinaryObjective, binary_step, deviation_scores
from nbfeatures.sae.e2e import E2EObjective, downstream_sites, kl_clean_to_spliced, nearest_neighbour_cosine
from nbfeatures.sae.relu import ReLUConfig, ReLUObjective, ReLUSAE
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from nbfeatures.train import TrainConfig, latest_checkpoint, train, train_sae

PACKAGE = pathlib.Path(nbfeatures.__file__).resolve().parent
SITE = "blocks.0.hook_resid_post"
NAN, INF = float("nan"), float("inf")


def raises_ours(fn, exc, pattern):
    """fn() raises `exc` matching `pattern`, from a `raise` in nbfeatures' own code."""
    with pytest.raises(exc, match=pattern) as info:
        fn()
    where = pathlib.Path(info.traceback[-1].path).resolve()
    assert PACKAGE in where.parents, f"raised from {where}, not from nbfeatures' own code"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sites.wrap(tiny_hf("gpt2"), tokenizer=word_tokenizer())
    g = torch.Generator().manual_seed(0)
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "afile").write_text("not a folder")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("someone's files")
    return dict(model=model, tokens=torch.randint(0, VOCAB - 1, (8, 6), generator=g), x=torch.randn(64, 32, generator=g),
                topk=TopKSAE(TopKConfig(32, 64, 4)), relu=ReLUSAE(ReLUConfig(32, 64)), bae=BinaryAE(BinaryConfig(32, 64)), tmp=tmp)


def _nan_row(x, value=NAN):
    x = x.clone()
    x[3, 5] = value
    return x


TC = dict(steps=2, batch_size=16)  # a valid TrainConfig to break one field of

# (id, callable(ctx), exception, regex naming the argument and what is allowed)
CASES = [
    # ------------------------------------------------------------------ TrainConfig
    ("steps=0", lambda c: TrainConfig(steps=0), ValueError, r"steps must be > 0 \(an int\), got 0"),
    ("steps<0", lambda c: TrainConfig(steps=-5), ValueError, r"steps must be > 0 \(an int\), got -5"),
    ("steps=str", lambda c: TrainConfig(steps="10"), ValueError, r"steps must be > 0 \(an int\), got '10' \(str\)"),
    ("steps=float", lambda c: TrainConfig(steps=2.5), ValueError, r"steps must be > 0 \(an int\), got 2.5 \(float\)"),
    ("steps=bool", lambda c: TrainConfig(steps=True), ValueError, r"steps must be > 0 \(an int\), got True \(bool\)"),
    ("batch_size=0", lambda c: TrainConfig(steps=2, batch_size=0), ValueError, r"batch_size must be > 0 \(an int\), got 0"),
    ("batch_size=float", lambda c: TrainConfig(steps=2, batch_size=2.5), ValueError, r"batch_size must be > 0 \(an int\), got 2.5"),
    ("batch_size<0", lambda c: TrainConfig(steps=2, batch_size=-1), ValueError, r"batch_size must be > 0 \(an int\), got -1"),
    ("lr=0", lambda c: TrainConfig(**TC, lr=0), ValueError, r"lr must be > 0 \(a finite number\), got 0"),
    ("lr<0", lambda c: TrainConfig(**TC, lr=-1e-3), ValueError, r"lr must be > 0 \(a finite number\), got -0.001"),
    ("lr=str", lambda c: TrainConfig(**TC, lr="1e-3"), ValueError, r"lr must be > 0 \(a finite number\), got '1e-3' \(str\)"),
    ("lr=nan", lambda c: TrainConfig(**TC, lr=NAN), ValueError, r"lr must be > 0 \(a finite number\), got nan"),
    ("lr=inf", lambda c: TrainConfig(**TC, lr=INF), ValueError, r"lr must be > 0 \(a finite number\), got inf"),
    ("lr=bool", lambda c: TrainConfig(**TC, lr=True), ValueError, r"lr must be > 0 \(a finite number\), got True \(bool\)"),
    ("grad_clip<0", lambda c: TrainConfig(**TC, grad_clip=-1.0), ValueError, r"grad_clip must be > 0 \(a finite number\), got -1.0"),
    ("grad_clip=0", lambda c: TrainConfig(**TC, grad_clip=0), ValueError, r"grad_clip must be > 0"),
    ("grad_clip=str", lambda c: TrainConfig(**TC, grad_clip="1"), ValueError, r"grad_clip must be > 0 \(a finite number\), got '1'"),
    ("warmup<0", lambda c: TrainConfig(**TC, warmup_steps=-1), ValueError, r"warmup_steps must be >= 0 \(an int\), got -1"),
    ("warmup=float", lambda c: TrainConfig(**TC, warmup_steps=1.5), ValueError, r"warmup_steps must be >= 0 \(an int\), got 1.5"),
    ("checkpoint_every<0", lambda c: TrainConfig(**TC, checkpoint_every=-1, checkpoint_dir="x"), ValueError,
     r"checkpoint_every must be >= 0 \(an int\), got -1"),
    ("checkpoint_every no dir", lambda c: TrainConfig(**TC, checkpoint_every=1), ValueError, r"checkpoint_every needs a checkpoint_dir"),
    ("log_every=0", lambda c: TrainConfig(**TC, log_every=0), ValueError, r"log_every must be > 0 \(an int\), got 0"),
    ("weight_decay<0", lambda c: TrainConfig(**TC, weight_decay=-0.1), ValueError, r"weight_decay must be >= 0 \(a finite number\)"),
    ("weight_decay=nan", lambda c: TrainConfig(**TC, weight_decay=NAN), ValueError, r"weight_decay must be >= 0 \(a finite number\), got nan"),
    ("decay_fraction>1", lambda c: TrainConfig(**TC, decay_fraction=1.5), ValueError, r"decay_fraction must be >= 0 and <= 1"),
    ("min_lr_ratio<0", lambda c: TrainConfig(**TC, min_lr_ratio=-0.1), ValueError, r"min_lr_ratio must be >= 0 and <= 1"),
    ("adam_betas one", lambda c: TrainConfig(**TC, adam_betas=(0.9,)), ValueError, r"adam_betas must be two numbers in \[0, 1\)"),
    ("adam_betas=1", lambda c: TrainConfig(**TC, adam_betas=(0.9, 1.0)), ValueError, r"adam_betas must be two numbers in \[0, 1\)"),
    ("adam_betas=str", lambda c: TrainConfig(**TC, adam_betas="ab"), ValueError, r"adam_betas must be two numbers in \[0, 1\)"),
    ("adam_betas=nan", lambda c: TrainConfig(**TC, adam_betas=(NAN, 0.9)), ValueError, r"adam_betas\[0\] must be >= 0 and <= 1"),
    ("adam_eps=0", lambda c: TrainConfig(**TC, adam_eps=0), ValueError, r"adam_eps must be > 0 \(a finite number\)"),
    ("schedule", lambda c: TrainConfig(**TC, schedule="step"), ValueError, r"schedule must be one of 'linear', 'cosine'; got 'step'"),
    ("resume value", lambda c: TrainConfig(**TC, resume="yes"), ValueError, r"resume must be one of 'auto', 'never', 'must'; got 'yes'"),
    ("resume no dir", lambda c: TrainConfig(**TC, resume="must"), ValueError, r"resume='must' needs a checkpoint_dir"),
    ("seed<0", lambda c: TrainConfig(**TC, seed=-1), ValueError, r"seed must be >= 0 \(an int\), got -1"),
    ("seed=str", lambda c: TrainConfig(**TC, seed="0"), ValueError, r"seed must be >= 0 \(an int\), got '0'"),
    ("checkpoint_dir=int", lambda c: TrainConfig(**TC, checkpoint_dir=5), ValueError, r"checkpoint_dir must be a folder path \(str or Path\) or None, got 5"),
    # ------------------------------------------------------------------ train_sae / train
    ("width", lambda c: train_sae(c["topk"], torch.randn(64, 16), TrainConfig(**TC), progress=False), ValueError,
     r"source has width 16 \(shape \[64, 16\]\) but the dictionary has d_in=32; pass activations \[N, 32\]"),
    ("int dtype", lambda c: train_sae(c["topk"], torch.ones(64, 32, dtype=torch.long), TrainConfig(**TC), progress=False), ValueError,
     r"source must be a 2-D float table \[N, D\] of activations; got Tensor of shape \[64, 32\] and dtype torch.int64"),
    ("1-D", lambda c: train_sae(c["topk"], torch.randn(32), TrainConfig(**TC), progress=False), ValueError,
     r"source must be a 2-D float table \[N, D\].*shape \[32\]"),
    ("3-D", lambda c: train_sae(c["topk"], torch.randn(4, 16, 32), TrainConfig(**TC), progress=False), ValueError,
     r"source must be a 2-D float table \[N, D\].*shape \[4, 16, 32\]"),
    ("list", lambda c: train_sae(c["topk"], [[0.0] * 32] * 64, TrainConfig(**TC), progress=False), ValueError,
     r"source must be activations \[N, D\] \(a float tensor, a numpy array or a harvested cache\[site\]\) or an object with "
     r"\.batch\(step\); got list"),
    ("nan row", lambda c: train_sae(c["topk"], _nan_row(c["x"]), TrainConfig(**TC), progress=False), ValueError,
     r"source has non-finite values \(NaN or inf\) in 1 row\(s\) \(first: row 3\); training needs finite activations"),
    ("inf row", lambda c: train_sae(c["topk"], _nan_row(c["x"], INF), TrainConfig(**TC), progress=False), ValueError,
     r"source has non-finite values \(NaN or inf\)"),
    ("too few rows", lambda c: train_sae(c["topk"], c["x"][:10], TrainConfig(**TC), progress=False), ValueError,
     r"need at least batch_size=16 activations, got 10"),
    ("batch width", lambda c: train_sae(c["topk"], TensorSource(torch.randn(64, 16), 16), TrainConfig(**TC), progress=False),
     ValueError, r"source.batch\(0\) has width 16 .* d_in=32"),
    ("sae=str", lambda c: train_sae("sae", c["x"], TrainConfig(**TC), progress=False), ValueError,
     r"sae must be a dictionary module \(TopKSAE, ReLUSAE, BinaryAE ...\), got str"),
    ("cfg=dict", lambda c: train_sae(c["topk"], c["x"], dict(TC), progress=False), ValueError, r"cfg must be a TrainConfig, got dict"),
    ("callbacks", lambda c: train_sae(c["topk"], c["x"], TrainConfig(**TC), callbacks=[1], progress=False), ValueError,
     r"callbacks must be a list of functions \(step, row\) -> None"),
    ("progress=str", lambda c: train_sae(c["topk"], c["x"], TrainConfig(**TC), progress="no"), ValueError,
     r"progress must be True or False, got 'no'"),
    ("checkpoint_dir file", lambda c: train_sae(c["topk"], c["x"], TrainConfig(**TC, checkpoint_dir=str(c["tmp"] / "afile")), progress=False),
     ValueError, r"checkpoint_dir .*afile is a file; it must be a folder"),
    ("resume must, none", lambda c: train_sae(c["topk"], c["x"], TrainConfig(**TC, checkpoint_dir=str(c["tmp"] / "empty"), resume="must"),
                                               progress=False), ValueError, r"resume='must' but .*empty holds no checkpoint"),  # fmt: skip
    ("train objective", lambda c: train(c["topk"], TensorSource(c["x"], 16), TrainConfig(**TC), "fvu", progress=False), ValueError,
     r"objective must be callable \(batch -> \(loss, logs\)\), got str"),
    ("train source", lambda c: train(c["topk"], c["x"], TrainConfig(**TC), c["topk"].default_objective(), progress=False), ValueError,
     r"source must have a .batch\(step\) method, got Tensor"),
    ("train module", lambda c: train(nn.ReLU(), TensorSource(c["x"], 16), TrainConfig(**TC), lambda b: None, progress=False), ValueError,
     r"module must be a torch nn.Module with parameters, got ReLU"),
    # ------------------------------------------------------------------ dictionary configs and modules
    ("TopK d_sae=str", lambda c: TopKConfig(16, "64", 4), ValueError, r"need d_in > 0 and d_sae > 0 \(ints\), got d_in=16, d_sae='64'"),
    ("TopK d_sae=float", lambda c: TopKConfig(16, 64.0, 4), ValueError, r"need d_in > 0 and d_sae > 0 \(ints\), got d_in=16, d_sae=64.0"),
    ("TopK d_in=bool", lambda c: TopKConfig(True, 64, 4), ValueError, r"need d_in > 0 and d_sae > 0 \(ints\), got d_in=True"),
    ("TopK d_in<0", lambda c: TopKConfig(-16, 64, 4), ValueError, r"need d_in > 0 and d_sae > 0 \(ints\), got d_in=-16"),
    ("TopK k=float", lambda c: TopKConfig(16, 64, 2.5), ValueError, r"need 0 < k <= d_sae, got k=2.5, d_sae=64 \(k an int\)"),
    ("TopK k=str", lambda c: TopKConfig(16, 64, "4"), ValueError, r"need 0 < k <= d_sae, got k='4'"),
    ("TopK k=0", lambda c: TopKConfig(16, 64, 0), ValueError, r"need 0 < k <= d_sae, got k=0"),
    ("TopK k>d_sae", lambda c: TopKConfig(16, 64, 65), ValueError, r"need 0 < k <= d_sae, got k=65, d_sae=64"),
    ("ReLU d_in=str", lambda c: ReLUConfig("16", 64), ValueError, r"ReLUConfig: need d_in > 0 and d_sae > 0 \(ints\), got d_in='16'"),
    ("ReLU d_sae=0", lambda c: ReLUConfig(16, 0), ValueError, r"ReLUConfig: need d_in > 0 and d_sae > 0 \(ints\), got d_in=16, d_sae=0"),
    ("ReLU d_sae=float", lambda c: ReLUConfig(16, 6.4), ValueError, r"ReLUConfig: need d_in > 0 and d_sae > 0 \(ints\)"),
    ("Binary estimator", lambda c: BinaryConfig(16, 64, "sgd"), ValueError, r"estimator must be one of 'ste', 'sigmoid_ste', 'reference'; got 'sgd'"),
    ("Binary d_in=float", lambda c: BinaryConfig(16.0, 64), ValueError, r"BinaryConfig: need d_in > 0 and d_sae > 0 \(ints\), got d_in=16.0"),
    ("Binary d_sae=None", lambda c: BinaryConfig(16, None), ValueError, r"BinaryConfig: need d_in > 0 and d_sae > 0 \(ints\), got d_in=16, d_sae=None"),
    ("TopKSAE cfg=dict", lambda c: TopKSAE({"d_in": 16, "d_sae": 64}), ValueError, r"TopKSAE: cfg must be a TopKConfig, got dict"),
    ("TopKSAE seed<0", lambda c: TopKSAE(TopKConfig(16, 64, 4), seed=-1), ValueError, r"TopKSAE: seed must be >= 0 \(an int\), got -1"),
    ("ReLUSAE seed=float", lambda c: ReLUSAE(ReLUConfig(16, 64), seed=1.5), ValueError, r"ReLUSAE: seed must be >= 0 \(an int\), got 1.5"),
    ("BinaryAE cfg=TopK", lambda c: BinaryAE(TopKConfig(16, 64, 4)), ValueError, r"BinaryAE: cfg must be a BinaryConfig, got TopKConfig"),
    ("encode_topk k", lambda c: c["topk"].encode_topk(c["x"], k=100), ValueError, r"encode_topk: k must be > 0 and <= 64 \(an int\), got 100"),
    # ------------------------------------------------------------------ objectives
    ("TopKObj aux<0", lambda c: TopKObjective(c["topk"], aux_coef=-1), ValueError, r"aux_coef must be >= 0 \(a finite number\), got -1"),
    ("TopKObj aux=str", lambda c: TopKObjective(c["topk"], aux_coef="0.1"), ValueError, r"aux_coef must be >= 0 \(a finite number\), got '0.1'"),
    ("TopKObj aux=nan", lambda c: TopKObjective(c["topk"], aux_coef=NAN), ValueError, r"aux_coef must be >= 0 \(a finite number\), got nan"),
    ("TopKObj k_aux=0", lambda c: TopKObjective(c["topk"], k_aux=0), ValueError, r"k_aux must be > 0 \(an int\), got 0"),
    ("TopKObj k_aux=float", lambda c: TopKObjective(c["topk"], k_aux=2.5), ValueError, r"k_aux must be > 0 \(an int\), got 2.5"),
    ("TopKObj dead=0", lambda c: TopKObjective(c["topk"], dead_tokens=0), ValueError, r"dead_tokens must be > 0 \(an int\), got 0"),
    ("TopKObj dead=str", lambda c: TopKObjective(c["topk"], dead_tokens="10"), ValueError, r"dead_tokens must be > 0 \(an int\), got '10'"),
    ("TopKObj multi=str", lambda c: TopKObjective(c["topk"], multi_topk="yes"), ValueError, r"multi_topk must be True or False, got 'yes'"),
    ("TopKObj multi 4k", lambda c: TopKObjective(TopKSAE(TopKConfig(8, 16, 8)), multi_topk=True), ValueError,
     r"multi_topk needs 4 \* k <= d_sae, got k=8, d_sae=16"),
    ("TopKObj batch width", lambda c: TopKObjective(c["topk"])(torch.randn(8, 16)), ValueError,
     r"TopKObjective: input has width 16 \(shape \[8, 16\]\), expected d_in=32"),
    ("TopKObj relu sae", lambda c: TopKObjective(c["relu"]), ValueError, r"TopKObjective: sae must be a TopKSAE"),
    ("ReLUObj l1<0", lambda c: ReLUObjective(c["relu"], l1_coef=-1), ValueError, r"l1_coef must be >= 0 \(a finite number\), got -1"),
    ("ReLUObj l1=nan", lambda c: ReLUObjective(c["relu"], l1_coef=NAN), ValueError, r"l1_coef must be >= 0 \(a finite number\), got nan"),
    ("ReLUObj l1=str", lambda c: ReLUObjective(c["relu"], l1_coef="1"), ValueError, r"l1_coef must be >= 0 \(a finite number\), got '1'"),
    ("ReLUObj dead<0", lambda c: ReLUObjective(c["relu"], dead_tokens=-1), ValueError, r"dead_tokens must be > 0 \(an int\), got -1"),
    ("ReLUObj sae=str", lambda c: ReLUObjective("sae"), ValueError, r"ReLUObjective: sae must be a dictionary module"),
    ("BinObj entropy=nan", lambda c: BinaryObjective(c["bae"], entropy_coef=NAN), ValueError, r"entropy_coef must be >= 0 \(a finite number\), got nan"),
    ("BinObj cov=str", lambda c: BinaryObjective(c["bae"], cov_coef="1"), ValueError, r"cov_coef must be >= 0 \(a finite number\), got '1'"),
    ("BinObj start=float", lambda c: BinaryObjective(c["bae"], entropy_start=1.5), ValueError, r"entropy_start must be >= 0 \(an int\), got 1.5"),
    ("BinObj start<0", lambda c: BinaryObjective(c["bae"], entropy_start=-1), ValueError, r"entropy_start must be >= 0 \(an int\), got -1"),
    ("BinObj threshold=inf", lambda c: BinaryObjective(c["bae"], entropy_threshold=INF), ValueError, r"entropy_threshold must be >= 0 \(a finite number\), got inf"),
    ("E2E kl=nan", lambda c: E2EObjective(c["model"], c["topk"], SITE, "e2e", kl_coef=NAN), ValueError, r"kl_coef must be >= 0 \(a finite number\), got nan"),
    ("E2E beta=str", lambda c: E2EObjective(c["model"], c["topk"], SITE, "e2e+ds", beta="1"), ValueError, r"beta must be >= 0 \(a finite number\), got '1'"),
    ("E2E l1<0", lambda c: E2EObjective(c["model"], c["topk"], SITE, "e2e", l1_coef=-1), ValueError, r"l1_coef must be >= 0 \(a finite number\), got -1"),
    ("E2E mask=str", lambda c: E2EObjective(c["model"], c["topk"], SITE, "e2e", mask_first="yes"), ValueError, r"mask_first must be True or False"),
    ("E2E sae=str", lambda c: E2EObjective(c["model"], "sae", SITE, "e2e"), ValueError, r"sae must be a dictionary module \(an nn.Module\), got str"),
    ("E2E site=int", lambda c: E2EObjective(c["model"], c["topk"], 3, "e2e"), ValueError, r"site must be one site name, got 3"),
    ("E2E kind", lambda c: E2EObjective(c["model"], c["topk"], SITE, "kl"), ValueError, r"kind must be 'local', 'e2e', 'e2e\+ds' or 'kl\+mse'; got 'kl'"),
    ("downstream site=int", lambda c: downstream_sites(c["model"], 3), ValueError, r"downstream sites need a site name like blocks.2.hook_resid_pre; got 3"),
    ("kl shapes", lambda c: kl_clean_to_spliced(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4)), ValueError,
     r"logits_clean and logits_spliced must be tensors of one shape \[..., V\], got \[2, 3, 5\] and \[2, 3, 4\]"),
    ("nn cosine 1-D", lambda c: nearest_neighbour_cosine(torch.zeros(5)), ValueError, r"W_dec must be a float tensor \[F, D\] with F >= 2, got Tensor \[5\]"),
    ("nn cosine chunk", lambda c: nearest_neighbour_cosine(torch.randn(4, 3), chunk=0), ValueError, r"chunk must be > 0 \(an int\), got 0"),
    ("binary_step estimator", lambda c: binary_step(torch.zeros(3), "sgd"), ValueError, r"estimator must be one of 'ste', 'sigmoid_ste', 'reference'; got 'sgd'"),
    ("deviation 1-D", lambda c: deviation_scores(torch.zeros(5)), ValueError, r"deviation_scores: bits must be a tensor \[N, F\] of 0/1 codes, got Tensor \[5\]"),
    ("deviation mean", lambda c: deviation_scores(torch.zeros(5, 3), torch.zeros(4)), ValueError, r"mean must be a tensor \[F\] with F=3, got \[4\]"),
    # ------------------------------------------------------------------ inversion configs
    ("Dec vocab=str", lambda c: DecoderConfig("64", 4, ("s",), 8, 0), ValueError, r"DecoderConfig: vocab_size must be > 0 \(an int\), got '64'"),
    ("Dec n_ctx=1", lambda c: DecoderConfig(64, 1, ("s",), 8, 0), ValueError, r"n_ctx must be > 1 \(an int\), got 1"),
    ("Dec d_act=float", lambda c: DecoderConfig(64, 4, ("s",), 2.5, 0), ValueError, r"d_act must be > 0 \(an int\), got 2.5"),
    ("Dec bos out", lambda c: DecoderConfig(64, 4, ("s",), 8, 64), ValueError, r"bos_id must be >= 0 and <= 63 \(an int\), got 64"),
    ("Dec eos<0", lambda c: DecoderConfig(64, 4, ("s",), 8, 0, eos_id=-1), ValueError, r"eos_id must be >= 0 and <= 63 \(an int\), got -1"),
    ("Dec heads=0", lambda c: DecoderConfig(64, 4, ("s",), 8, 0, n_heads=0), ValueError, r"n_heads must be > 0 \(an int\), got 0"),
    ("Dec layers=bool", lambda c: DecoderConfig(64, 4, ("s",), 8, 0, n_layers=True), ValueError, r"n_layers must be > 0 \(an int\), got True"),
    ("Dec sites=str", lambda c: DecoderConfig(64, 4, "blocks.0", 8, 0), ValueError, r"sites must be a non-empty list of distinct site names, got 'blocks.0'"),
    ("Dec heads divide", lambda c: DecoderConfig(64, 4, ("s",), 8, 0, d_model=30), ValueError, r"d_model \(30\) must be divisible by n_heads \(4\)"),
    ("Rebal nan", lambda c: RebalanceConfig(rebalance=NAN), ValueError, r"rebalance must be >= 0 \(a finite number\), got nan"),
    ("Rebal str", lambda c: RebalanceConfig(rebalance="6"), ValueError, r"rebalance must be >= 0 \(a finite number\), got '6'"),
    ("Rebal every=float", lambda c: RebalanceConfig(eval_every=1.5), ValueError, r"eval_every must be >= 0 \(an int\), got 1.5"),
    ("Rebal queries=0", lambda c: RebalanceConfig(eval_queries=0), ValueError, r"eval_queries must be > 0 \(an int\), got 0"),
    ("Rebal samples=str", lambda c: RebalanceConfig(eval_samples="8"), ValueError, r"eval_samples must be > 0 \(an int\), got '8'"),
    ("Rebal eps=0", lambda c: RebalanceConfig(epsilon=0), ValueError, r"epsilon must be > 0 \(a finite number\), got 0"),
    ("Rebal no every", lambda c: RebalanceConfig(rebalance=6.0), ValueError, r"rebalance must be >= 0 and needs eval_every >= 1"),
    # ------------------------------------------------------------------ harvest and batch sources
    ("n_tokens=0", lambda c: harvest(c["model"], c["tokens"], SITE, n_tokens=0, progress=False), ValueError, r"n_tokens must be > 0 \(an int\), got 0"),
    ("n_tokens<0", lambda c: harvest(c["model"], c["tokens"], SITE, n_tokens=-5, progress=False), ValueError, r"n_tokens must be > 0 \(an int\), got -5"),
    ("n_tokens=float", lambda c: harvest(c["model"], c["tokens"], SITE, n_tokens=2.5, progress=False), ValueError, r"n_tokens must be > 0 \(an int\), got 2.5"),
    ("h batch_size=0", lambda c: harvest(c["model"], c["tokens"], SITE, batch_size=0, progress=False), ValueError, r"batch_size must be > 0 \(an int\), got 0"),
    ("h batch_size=str", lambda c: harvest(c["model"], c["tokens"], SITE, batch_size="32", progress=False), ValueError, r"batch_size must be > 0 \(an int\), got '32'"),
    ("shard_tokens=0", lambda c: harvest(c["model"], c["tokens"], SITE, shard_tokens=0, progress=False), ValueError, r"shard_tokens must be > 0 \(an int\), got 0"),
    ("h dtype=int", lambda c: harvest(c["model"], c["tokens"], SITE, dtype=torch.int64, progress=False), ValueError,
     r"dtype must be one of torch.float32, torch.float16, torch.bfloat16, torch.float64; got torch.int64"),
    ("h dtype=str", lambda c: harvest(c["model"], c["tokens"], SITE, dtype="float32", progress=False), ValueError, r"dtype must be one of torch.float32.*got 'float32'"),
    ("h sites=[]", lambda c: harvest(c["model"], c["tokens"], [], progress=False), ValueError, r"sites must be a site name or a non-empty list of distinct site names, got \[\]"),
    ("h sites dup", lambda c: harvest(c["model"], c["tokens"], [SITE, SITE], progress=False), ValueError, r"sites must be .*distinct site names"),
    ("h sites=int", lambda c: harvest(c["model"], c["tokens"], 5, progress=False), ValueError, r"sites must be a site name .*, got 5"),
    ("h drop_first=str", lambda c: harvest(c["model"], c["tokens"], SITE, drop_first="no", progress=False), ValueError, r"drop_first must be True or False, got 'no'"),
    ("h resume no folder", lambda c: harvest(c["model"], c["tokens"], SITE, resume=True, progress=False), ValueError,
     r"resume=True needs a folder"),
    ("h resume=str", lambda c: harvest(c["model"], c["tokens"], SITE, resume="yes", progress=False), ValueError, r"resume must be True or False"),
    ("h edits=obj", lambda c: harvest(c["model"], c["tokens"], SITE, edits=5, progress=False), ValueError, r"edits must be a list of edits"),
    ("h folder not harvest", lambda c: harvest(c["model"], c["tokens"], SITE, folder=c["tmp"] / "notes", progress=False), ValueError,
     r"folder .*notes exists and holds no harvest \(no manifest.json\)"),
    ("h folder is file", lambda c: harvest(c["model"], c["tokens"], SITE, folder=c["tmp"] / "afile", progress=False), ValueError, r"afile exists and holds no harvest"),
    ("h float tokens", lambda c: harvest(c["model"], c["tokens"].float(), SITE, progress=False), ValueError, r"token tensor must be integer \[N, T\]"),
    ("h negative ids", lambda c: harvest(c["model"], -c["tokens"] - 1, SITE, progress=False), ValueError, r"token ids must be >= 0"),
    ("h float sequences", lambda c: harvest(c["model"], [[1.5, 2.0]], SITE, progress=False), ValueError,
     r"each token sequence must be a non-empty 1-D list of int ids >= 0; got \[1.5, 2.0\]"),
    ("h empty sequence", lambda c: harvest(c["model"], [[]], SITE, progress=False), ValueError, r"each token sequence must be a non-empty"),
    ("h tokens=str", lambda c: harvest(c["model"], "hello", SITE, progress=False), ValueError, r"tokens must be an integer tensor \[N, T\], a datasets.Dataset or an iterable of sequences; got str"),
    ("token_batches 0", lambda c: list(token_batches(c["tokens"], 0)), ValueError, r"token_batches: batch_size must be > 0 \(an int\), got 0"),
    ("TensorSource 1-D", lambda c: TensorSource(torch.zeros(40), 8), ValueError, r"TensorSource: acts must be a 2-D table \[N, D\].*shape \[40\]"),
    ("TensorSource list", lambda c: TensorSource([[1.0]] * 40, 8), ValueError, r"TensorSource: acts must be a 2-D table \[N, D\].*got list"),
    ("TensorSource bs=0", lambda c: TensorSource(c["x"], 0), ValueError, r"TensorSource: batch_size must be > 0 \(an int\), got 0"),
    ("TensorSource seed", lambda c: TensorSource(c["x"], 8, seed=-1), ValueError, r"TensorSource: seed must be >= 0 \(an int\), got -1"),
    ("ModelSource bs=0", lambda c: ModelSource(c["model"], SITE, c["tokens"], batch_size=0), ValueError, r"ModelSource: batch_size must be > 0 \(an int\), got 0"),
    ("ModelSource buffer", lambda c: ModelSource(c["model"], SITE, c["tokens"], 8, buffer_tokens=2.5), ValueError, r"buffer_tokens must be > 0 \(an int\), got 2.5"),
    ("ModelSource site", lambda c: ModelSource(c["model"], [SITE], c["tokens"], 8), ValueError, r"ModelSource: site must be one site name"),
    ("TokenSource float", lambda c: TokenSource(c["tokens"].float(), 4), ValueError, r"TokenSource needs an integer tensor \[N, T\]; got Tensor torch.float32"),
    ("TokenSource negative", lambda c: TokenSource(-c["tokens"] - 1, 4), ValueError, r"TokenSource: token ids must be >= 0"),
]


@pytest.mark.parametrize("fn, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(ctx, fn, exc, pattern):
    raises_ours(lambda: fn(ctx), exc, pattern)


def test_good_values_are_normalised():
    cfg = TrainConfig(steps=np.int64(3), lr=np.float32(1e-3), checkpoint_dir=pathlib.Path("x"))
    assert type(cfg.steps) is int and type(cfg.lr) is float and cfg.checkpoint_dir == "x"
    assert type(TopKConfig(np.int64(8), 16, np.int32(2)).k) is int


# ----------------------------------------------------------------------------- corrupt and foreign shards


@pytest.fixture(scope="module")
def shards(ctx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("h") / "acts"
    harvest(ctx["model"], ctx["tokens"], SITE, batch_size=2, folder=folder, shard_tokens=10, progress=False)
    return folder


def _spoiled(shards, tmp_path, spoil):
    import shutil

    copy = tmp_path / "acts"
    shutil.copytree(shards, copy)
    spoil(copy)
    return copy


@pytest.mark.parametrize("spoil, pattern", [
    (lambda f: (f / "blocks.0.hook_resid_post.00001.npy").write_bytes((f / "blocks.0.hook_resid_post.00001.npy").read_bytes()[:-40]),
     r"blocks.0.hook_resid_post.00001.npy: shard is \d+ bytes, its header says \d+ \(truncated or appended to\)"),
    (lambda f: np.save(f / "blocks.0.hook_resid_post.00000.npy", np.zeros((12, 32), dtype=np.int64)),
     r"00000.npy: shard holds a int64 array of shape \[12, 32\]; the manifest needs a 2-D float32 array \[N, D\]"),
    (lambda f: np.save(f / "blocks.0.hook_resid_post.00000.npy", np.zeros(12, dtype=np.float32)),
     r"00000.npy: shard holds a float32 array of shape \[12\]; the manifest needs a 2-D float32 array"),
    (lambda f: np.save(f / "blocks.0.hook_resid_post.00000.npy", np.zeros((12, 31), dtype=np.float32)),
     r"the shards of 'blocks.0.hook_resid_post' hold \d+ rows of widths \[31, 32\]; the manifest says 40 rows of one width"),
    (lambda f: (f / "blocks.0.hook_resid_post.00000.npy").write_bytes(b"PK\x03\x04 a zip file"),
     r"00000.npy: not a readable .npy shard \(corrupt, truncated or another format\)"),
    (lambda f: (f / "blocks.0.hook_resid_post.00002.npy").unlink(), r"00002.npy: shard not found"),
    (lambda f: (f / "manifest.json").write_text('{"files": {"s": ["../x.npy"]}, "n_tokens": 3}'),
     r"shard name '../x.npy' is not a plain .npy file name in the folder"),
    (lambda f: (f / "manifest.json").write_text('{"files": {"s": ["a.npy"]}, "n_tokens": 3, "dtype": "int8"}'),
     r"manifest.json: dtype 'int8' is not one of float32, float16, bfloat16, float64"),
    (lambda f: (f / "manifest.json").write_text('{"files": [], "n_tokens": 3}'), r"'files' must map each site to a non-empty list of shard names"),
], ids=["truncated", "int64", "1-D", "width", "zip", "missing", "path", "dtype", "files"])
def test_corrupt_or_foreign_shard_is_refused_by_name(shards, tmp_path, spoil, pattern):
    assert len(ActivationCache.open(shards)) == 40  # 8 sequences x 5 positions
    raises_ours(lambda: ActivationCache.open(_spoiled(shards, tmp_path, spoil)), ValueError, pattern)


# ----------------------------------------------------------------------------- interrupted harvests


class Flaky:
    """Token sequences that raise after `fail_at` of them have been read (None: never), like a dropped stream."""

    def __init__(self, tokens, fail_at=None):
        self.tokens, self.fail_at = tokens, fail_at

    def __iter__(self):
        for i, row in enumerate(self.tokens):
            if i == self.fail_at:
                raise ConnectionError("stream dropped")
            yield row


def _read_all(folder):
    cache = ActivationCache.open(folder)
    return {s: cache[s][:].clone() for s in cache.sites}, sorted(p.name for p in pathlib.Path(folder).iterdir())


def test_interrupted_reharvest_leaves_the_old_harvest_whole(ctx, tmp_path):
    folder = tmp_path / "acts"
    harvest(ctx["model"], ctx["tokens"], SITE, batch_size=2, folder=folder, shard_tokens=10, progress=False)
    before = _read_all(folder)
    other = torch.randint(0, VOCAB - 1, (8, 6), generator=torch.Generator().manual_seed(9))
    with pytest.raises(ConnectionError):
        harvest(ctx["model"], Flaky(other, fail_at=5), SITE, batch_size=2, folder=folder, shard_tokens=10, progress=False)
    after = _read_all(folder)
    assert after[1] == before[1]  # same files: no new shard in the old folder
    assert all(torch.equal(after[0][s], before[0][s]) for s in before[0])  # and the manifest still reads the old data


def test_interrupted_harvest_resumes_to_the_uninterrupted_result(ctx, tmp_path):
    args = dict(batch_size=2, shard_tokens=7, progress=False, n_tokens=37)
    straight = harvest(ctx["model"], ctx["tokens"], SITE, folder=tmp_path / "a", **args)
    with pytest.raises(ConnectionError):
        harvest(ctx["model"], Flaky(ctx["tokens"], fail_at=5), SITE, folder=tmp_path / "b", **args)
    partial = tmp_path / ".partial_b"
    assert not (tmp_path / "b").exists() and sorted(p.name for p in partial.glob("*.npy"))
    kept = {p.name: p.stat().st_ino for p in partial.glob("*.npy")}  # shards of the sequences read before the drop
    resumed = harvest(ctx["model"], Flaky(ctx["tokens"]), SITE, folder=tmp_path / "b", resume=True, **args)
    assert all((tmp_path / "b" / name).stat().st_ino == ino for name, ino in kept.items())  # reused, not rewritten
    assert _read_all(tmp_path / "a")[1] == _read_all(tmp_path / "b")[1]
    assert torch.equal(resumed[SITE][:], straight[SITE][:]) and len(resumed) == 37
    assert not partial.exists()
    # resuming with other arguments is refused, naming them
    with pytest.raises(ConnectionError):
        harvest(ctx["model"], Flaky(ctx["tokens"], fail_at=5), SITE, folder=tmp_path / "c", **args)
    raises_ours(lambda: harvest(ctx["model"], ctx["tokens"], SITE, folder=tmp_path / "c", resume=True, **{**args, "shard_tokens": 8}),
                ValueError, r"holds an interrupted harvest with other arguments \(shard_tokens: 7 there, 8 now\)")
    other = torch.randint(0, VOCAB - 1, (8, 6), generator=torch.Generator().manual_seed(9))
    raises_ours(lambda: harvest(ctx["model"], other, SITE, folder=tmp_path / "c", resume=True, **args),
                ValueError, r"holds an interrupted harvest with other arguments \(tokens: ")
    # a resume with nothing pending opens the complete harvest instead of redoing it
    ino = (tmp_path / "a" / "manifest.json").stat().st_ino
    assert len(harvest(ctx["model"], ctx["tokens"], SITE, folder=tmp_path / "a", resume=True, **args)) == 37
    assert (tmp_path / "a" / "manifest.json").stat().st_ino == ino


# ----------------------------------------------------------------------------- checkpoints of another data source


def test_checkpoint_of_other_data_is_refused_unless_resume_must(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 16, generator=g), torch.randn(256, 16, generator=g)

    def run(data, steps, **kw):
        """The steps this call trained (a resumed run trains only those after its checkpoint)."""
        sae, trained = TopKSAE(TopKConfig(16, 32, 4)), []
        train_sae(sae, data, TrainConfig(steps=steps, batch_size=32, checkpoint_dir=str(tmp_path), log_every=1, **kw),
                  callbacks=[lambda step, row: trained.append(step)], progress=False)  # fmt: skip
        return trained

    assert run(x, 3) == [1, 2, 3]
    raises_ours(lambda: run(y, 5), ValueError, r"holds another run: its data is .* \(differs in: batch_0_sha256\)\. Pass "
                                               r"TrainConfig\(resume='must'\) to continue this run on the new data")  # fmt: skip
    raises_ours(lambda: run(x[:128], 5), ValueError, r"its data is .*'rows': 256.*this run's is .*'rows': 128")
    raises_ours(lambda: run(x, 5, resume="never"), ValueError, r"already holds a checkpoint \(step_00000003\) and resume='never'")
    assert run(x, 4) == [4]  # same data: resumes, as before
    assert run(y, 6, resume="must") == [5, 6]  # asked for: continues on the new data
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    assert run(y, 7) == [7]  # and the checkpoint now carries the new data's fingerprint
    raises_ours(lambda: run(x, 8), ValueError, r"differs in: batch_0_sha256")
