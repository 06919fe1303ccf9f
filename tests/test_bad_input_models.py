"""Bad input to the model-level entry points (zoo loader, codebooks, InversionView) is refused by our own `raise`.

Each row: (what, callable on the shared tiny environment, exception type, regex naming the argument and what is
allowed). Every case also checks that the innermost traceback frame is inside the nbfeatures package, so the
error is ours and not one torch or transformers happened to throw.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nbfeatures
from conftest import BOS, tiny_hf, word_tokenizer
from nbfeatures import sites as S
from nbfeatures import zoo
from nbfeatures.codebook import (BlockCodes, CodebookConfig, CodebookLayer, CodebookModel, CodebookTrainConfig, ForceCodes, IVFConfig,
                                 NeuronBaseline, PatchCodes, argmax_last, best_code_per_label, build_ivf, collect_codes,
                                 exact_topk, load_codebook_layer, load_codebook_model, neuron_precision_at_recall, rank_codes,
                                 regex_targets, save_codebook_layer, topk_last)
from nbfeatures.inversion import (DecoderConfig, FeatureSite, InversionDecoder, PairSource, distance, feature_query, generate,
                                  panel_callables, query_activation, read_sites, sample, strongest_latent, token_logprobs)
from nbfeatures.sae import TopKConfig, TopKSAE

PKG = Path(nbfeatures.__file__).resolve().parent
MLP0, MLP1, HEADS, SITE = "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.0.hook_resid_pre"
NAN = float("nan")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = S.wrap(tiny_hf("gpt2"), tokenizer=word_tokenizer())
    cb = CodebookModel(model, {MLP0: CodebookLayer(CodebookConfig(32, 40)), MLP1: CodebookLayer(CodebookConfig(32, 40), seed=1),
                               HEADS: CodebookLayer(CodebookConfig(8, 20, k=2, n_groups=4))})  # fmt: skip
    dec = InversionDecoder(DecoderConfig(vocab_size=64, n_ctx=3, sites=(SITE,), d_act=32, bos_id=BOS, d_model=32, n_heads=2,
                                         n_layers=1, n_act_blocks=1))  # fmt: skip
    sae = TopKSAE(TopKConfig(32, 16, 4))
    # folders: a model without tokenizer files, one whose only tokenizer file is an empty config, corrupt ones
    no_tok = tmp / "no_tokenizer"
    tiny_hf("gpt2").save_pretrained(no_tok)
    empty_tok = tmp / "empty_tokenizer"
    tiny_hf("gpt2").save_pretrained(empty_tok)
    (empty_tok / "tokenizer_config.json").write_text("{}")
    bad_config = tmp / "bad_config"
    tiny_hf("gpt2").save_pretrained(bad_config)
    (bad_config / "config.json").write_text("{not json")
    bad_weights = tmp / "bad_weights"
    tiny_hf("gpt2").save_pretrained(bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"\x00" * 64)
    no_sites = tmp / "cb_no_sites"
    no_sites.mkdir()
    (no_sites / "codebooks.json").write_text(json.dumps({"format": "nbfeatures.codebook_model", "sites": []}))
    bad_cb = tmp / "cb_bad_config"
    cb.save(bad_cb)
    meta = json.loads((bad_cb / "codebooks.json").read_text())
    meta["sites"][MLP0]["n_codes"] = "40"
    (bad_cb / "codebooks.json").write_text(json.dumps(meta))
    layer_nan = tmp / "layer_nan"
    nan_layer = CodebookLayer(CodebookConfig(32, 40))
    with torch.no_grad():
        nan_layer.codebook[0, 3, 0] = NAN
    save_codebook_layer(nan_layer, layer_nan)
    layer_badcfg = tmp / "layer_badcfg"
    save_codebook_layer(CodebookLayer(CodebookConfig(32, 40)), layer_badcfg)
    (layer_badcfg / "codebook.json").write_text(json.dumps({"config": {"d_in": 32, "n_codes": 40, "colour": "red"}}))
    ids = torch.randint(0, 63, (2, 5), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(model=model, cb=cb, layer=cb.layer(MLP0), heads=cb.layer(HEADS), dec=dec, sae=sae,
                           fs=FeatureSite.from_sae(sae, SITE), q=torch.tensor([BOS, 1, 2]), ids=ids, x=torch.randn(2, 5, 32),
                           no_tok=no_tok, empty_tok=empty_tok, bad_config=bad_config, bad_weights=bad_weights,
                           no_sites=no_sites, bad_cb=bad_cb, layer_nan=layer_nan, layer_badcfg=layer_badcfg, tmp=tmp)  # fmt: skip


def _sample(e, **kw):
    args = dict(query=e.q, position=1)
    args.update(kw)
    return sample(e.dec, e.model, SITE, **args)


def _inputs(n, seed):
    return torch.cat([torch.full((n, 1), BOS), torch.randint(0, 8, (n, 2), generator=torch.Generator().manual_seed(seed))], 1)


CASES = [
    # ---- zoo: folders, names, devices
    ("load_model: folder without tokenizer", lambda e: zoo.load_model(e.no_tok), ValueError, r"no_tokenizer has no tokenizer \(looked for \[.*'tokenizer\.json'"),
    ("wrap: folder without tokenizer", lambda e: nbfeatures.wrap(e.no_tok), ValueError, r"has no tokenizer \(looked for .*tokenizer_config\.json"),
    ("load_pretrained: empty tokenizer", lambda e: zoo.load_pretrained(e.empty_tok), ValueError, r"empty_tokenizer: the tokenizer there has an empty vocabulary .*needs tokenizer\.json"),
    ("load_pretrained: int name", lambda e: zoo.load_pretrained(123), ValueError, r"name_or_path must be a zoo name .*got 123"),
    ("load_pretrained: empty name", lambda e: zoo.load_pretrained(""), ValueError, r"name_or_path must be a zoo name .*non-empty"),
    ("load_pretrained: bad device", lambda e: zoo.load_pretrained("tokfsm", device="gpu9"), ValueError, r"device must be None, a torch\.device or a device string .*'gpu9'"),
    ("load_pretrained: corrupt config.json", lambda e: zoo.load_pretrained(e.bad_config), ValueError, r"bad_config is not a loadable transformers model folder \(config\.json or weights corrupt"),
    ("load_pretrained: corrupt weights", lambda e: zoo.load_pretrained(e.bad_weights), ValueError, r"bad_weights is not a loadable transformers model folder"),
    ("load_pretrained: nested missing path", lambda e: zoo.load_pretrained("no/such/deep/folder"), ValueError, r"no folder at 'no/such/deep/folder' .*available"),
    ("load_codebook_model: sites not a dict", lambda e: load_codebook_model(e.no_sites), ValueError, r"'sites' must map each site name to its codebook config, got \[\]"),
    ("load_codebook_model: bad saved config", lambda e: load_codebook_model(e.bad_cb), ValueError, r"codebook for blocks\.0\.hook_mlp_out: the saved config .* is not a CodebookConfig .*n_codes must be an integer"),
    # ---- codebook configs
    ("CodebookConfig: d_in str", lambda e: CodebookConfig("32", 40), TypeError, r"CodebookConfig\.d_in must be an integer; got str '32'"),
    ("CodebookConfig: n_codes float", lambda e: CodebookConfig(32, 40.0), TypeError, r"CodebookConfig\.n_codes must be an integer; got float 40\.0"),
    ("CodebookConfig: k float", lambda e: CodebookConfig(32, 40, k=1.5), TypeError, r"CodebookConfig\.k must be an integer; got float 1\.5"),
    ("CodebookConfig: k bool", lambda e: CodebookConfig(32, 40, k=True), TypeError, r"CodebookConfig\.k must be an integer; got bool True"),
    ("CodebookConfig: n_groups str", lambda e: CodebookConfig(32, 40, n_groups="4"), TypeError, r"CodebookConfig\.n_groups must be an integer"),
    ("CodebookConfig: zero d_in", lambda e: CodebookConfig(0, 40), ValueError, r"need d_in, n_codes, n_groups > 0; got 0, 40, 1"),
    ("CodebookConfig: reduce None", lambda e: CodebookConfig(32, 40, reduce=None), ValueError, r"reduce must be 'sum' or 'mean', got None"),
    ("IVFConfig: n_probe str", lambda e: IVFConfig(n_probe="4"), TypeError, r"IVFConfig\.n_probe must be an integer; got str"),
    ("IVFConfig: n_lists float", lambda e: IVFConfig(n_lists=2.5), TypeError, r"IVFConfig\.n_lists must be an integer; got float 2\.5"),
    ("IVFConfig: negative iters", lambda e: IVFConfig(iters=-1), ValueError, r"IVFConfig needs n_lists >= 0, n_probe > 0, iters >= 0"),
    ("CodebookTrainConfig: mse_coef str", lambda e: CodebookTrainConfig(mse_coef="1"), TypeError, r"CodebookTrainConfig\.mse_coef must be a finite number >= 0[;,] got str"),
    ("CodebookTrainConfig: NaN lr factor", lambda e: CodebookTrainConfig(model_lr_factor=NAN), ValueError, r"CodebookTrainConfig\.model_lr_factor must be a finite number >= 0[;,] got nan"),
    ("CodebookTrainConfig: replace_after float", lambda e: CodebookTrainConfig(replace_after=1.5), TypeError, r"CodebookTrainConfig\.replace_after must be an integer >= 0"),
    ("CodebookLayer: not a config", lambda e: CodebookLayer({"d_in": 32}), TypeError, r"CodebookLayer takes a CodebookConfig, got dict"),
    ("CodebookLayer: seed str", lambda e: CodebookLayer(CodebookConfig(32, 40), seed="0"), TypeError, r"seed must be an integer; got str"),
    # ---- codebook layer inputs
    ("layer: NaN input", lambda e: e.layer(torch.full((2, 32), NAN)), ValueError, r"CodebookLayer at blocks\.0\.hook_mlp_out\(d_in=32, n_codes=40, k=1, n_groups=1\): input holds 64 non-finite values \(NaN or inf\)"),
    ("layer: inf input", lambda e: CodebookLayer(CodebookConfig(32, 40))(torch.tensor([[math.inf] + [0.0] * 31])), ValueError, r"CodebookLayer\(d_in=32, n_codes=40, k=1, n_groups=1\): input holds 1 non-finite values .*only finite"),
    ("layer: list input", lambda e: e.layer([[0.0] * 32]), TypeError, r"input must be a float tensor \[\.\.\., 32\], got list"),
    ("layer: int input", lambda e: e.layer(torch.zeros(2, 32, dtype=torch.long)), ValueError, r"input dtype torch\.int64 is not floating point"),
    ("layer: wrong width", lambda e: e.layer(torch.zeros(2, 31)), ValueError, r"input ends in \[31\] .*expected \[32\]"),
    ("layer: float ids", lambda e: e.layer(e.x, ids=torch.zeros(2, 5, 1)), ValueError, r"ids must be an integer tensor \[\.\.\., K=1\], got torch\.float32"),
    ("layer: negative ids", lambda e: e.layer(e.x, ids=torch.full((2, 5, 1), -1)), ValueError, r"ids must lie in \[0, n_codes=40\), got -1\.\.-1"),
    ("layer: ids of wrong size", lambda e: e.layer(e.x, ids=torch.zeros(2, 5, 2, dtype=torch.long)), ValueError, r"do not give k=1 codes per token for 10 tokens"),
    ("layer: exclude every code", lambda e: e.layer(e.x, exclude=torch.ones(1, 40, dtype=torch.bool)), ValueError, r"exclude leaves 0 codes in some group, fewer than k=1; at most n_codes - k = 39"),
    ("layer: exclude wrong shape", lambda e: e.layer(e.x, exclude=torch.ones(40, dtype=torch.bool)), ValueError, r"exclude must be a bool tensor \[n_groups, n_codes\] = \[1, 40\]"),
    ("layer: negative noise", lambda e: e.layer.replace_dead_codes_(noise=-1.0), ValueError, r"noise must be a finite number >= 0"),
    ("layer: k-means iters float", lambda e: e.layer.init_kmeans_(torch.randn(64, 32), iters=2.5), TypeError, r"iters must be an integer >= 0; got float"),
    ("layer: use_ivf str", lambda e: e.layer.use_ivf("fast"), TypeError, r"use_ivf takes an IVFConfig or None, got str"),
    ("save_codebook_layer: not a layer", lambda e: save_codebook_layer("layer", e.tmp / "x"), TypeError, r"save_codebook_layer saves a CodebookLayer, got str"),
    ("load_codebook_layer: foreign config", lambda e: load_codebook_layer(e.layer_badcfg), ValueError, r"layer_badcfg: codebook: the saved config .*'colour'.* is not a CodebookConfig"),
    ("load_codebook_layer: NaN codebook", lambda e: load_codebook_layer(e.layer_nan), ValueError, r"layer_nan: codebook must hold finite floats"),
    # ---- code search kernels
    ("exact_topk: k = 0", lambda e: exact_topk(torch.randn(1, 4, 8), torch.randn(1, 10, 8), 0), ValueError, r"k must be an integer in \[1, 10\]; got 0"),
    ("exact_topk: k > C", lambda e: exact_topk(torch.randn(1, 4, 8), torch.randn(1, 10, 8), 11), ValueError, r"k must be an integer in \[1, 10\]; got 11"),
    ("exact_topk: shapes disagree", lambda e: exact_topk(torch.randn(1, 4, 8), torch.randn(2, 10, 8), 1), ValueError, r"queries \[G, N, E\] and codes \[G, C, E\] must agree"),
    ("topk_last: k float", lambda e: topk_last(torch.randn(3, 5), 2.0), TypeError, r"k must be an integer in \[1, 5\]; got float"),
    ("argmax_last: empty", lambda e: argmax_last(torch.randn(3, 0)), ValueError, r"argmax_last takes a float tensor with a non-empty last dimension"),
    ("build_ivf: integer codebook", lambda e: build_ivf(torch.zeros(1, 10, 8, dtype=torch.long), 2), ValueError, r"codebook must be a float tensor \[G, C, E\]"),
    ("build_ivf: n_lists str", lambda e: build_ivf(torch.randn(1, 10, 8), "2"), TypeError, r"n_lists must be an integer; got str"),
    # ---- interventions
    ("ForceCodes: -1", lambda e: ForceCodes(MLP0, e.layer, (-1,)), ValueError, r"ForceCodes at blocks\.0\.hook_mlp_out: codes must lie in \[0, 40\) .*-1 does not mean the last code"),
    ("ForceCodes: 1.5", lambda e: ForceCodes(MLP0, e.layer, (1.5,)), TypeError, r"codes must be a tuple of ints in \[0, n_codes=40\)"),
    ("ForceCodes: bool code", lambda e: ForceCodes(MLP0, e.layer, (True,)), TypeError, r"codes must be a tuple of ints"),
    ("ForceCodes: bare int", lambda e: ForceCodes(MLP0, e.layer, 7), TypeError, r"codes must be a tuple of ints .*e\.g\. \(7,\); got 7"),
    ("ForceCodes: not a layer", lambda e: ForceCodes(MLP0, "layer", (1,)), TypeError, r"ForceCodes at blocks\.0\.hook_mlp_out: layer must be the CodebookLayer at that site"),
    ("ForceCodes: site not str", lambda e: ForceCodes(0, e.layer, (1,)), TypeError, r"ForceCodes: site must be a site name \(str\), got int"),
    ("ForceCodes: group float", lambda e: ForceCodes(HEADS, e.heads, (1,), mode="last", group=1.0), TypeError, r"group must be an integer; got float"),
    ("ForceCodes: wrong count", lambda e: ForceCodes(HEADS, e.heads, (1,)), ValueError, r"mode 'all' with k=2 takes exactly k codes, got 1"),
    ("BlockCodes: every code", lambda e: BlockCodes(MLP0, e.layer, tuple(range(40))), ValueError, r"blocking 40 of n_codes=40 codes leaves fewer than k=1 to choose from; block at most n_codes - k = 39"),
    ("BlockCodes: all but one, k=2", lambda e: BlockCodes(HEADS, e.heads, tuple(range(19))), ValueError, r"blocking 19 of n_codes=20 codes leaves fewer than k=2"),
    ("BlockCodes: -1", lambda e: BlockCodes(MLP0, e.layer, (-1,)), ValueError, r"BlockCodes at blocks\.0\.hook_mlp_out: codes must lie in \[0, 40\)"),
    ("BlockCodes: 1.5", lambda e: BlockCodes(MLP0, e.layer, (1.5,)), TypeError, r"BlockCodes at .*codes must be a tuple of ints"),
    ("PatchCodes: bool codes", lambda e: PatchCodes(MLP0, e.layer, torch.ones(2, 1, dtype=torch.bool)), ValueError, r"codes must be an integer tensor \[B, 1\], got torch\.bool"),
    ("PatchCodes: out of range", lambda e: PatchCodes(MLP0, e.layer, torch.full((2, 1), 40)), ValueError, r"codes must lie in \[0, 40\)"),
    ("run: block 0's codebook at block 1", lambda e: e.cb.run(e.ids, [ForceCodes(MLP1, e.layer, (3,))]), ValueError,
     r"ForceCodes at blocks\.1\.hook_mlp_out holds the codebook of blocks\.0\.hook_mlp_out, not the one at blocks\.1\.hook_mlp_out; pass cb\.layer"),
    ("generate: block 0's codebook at block 1", lambda e: e.cb.generate(e.ids, [BlockCodes(MLP1, e.layer, (3,))], max_new_tokens=1), ValueError,
     r"BlockCodes at blocks\.1\.hook_mlp_out holds the codebook of blocks\.0\.hook_mlp_out"),
    ("edits: a foreign codebook", lambda e: e.cb.edits([ForceCodes(MLP0, CodebookLayer(CodebookConfig(32, 40)), (3,))]), ValueError,
     r"ForceCodes at blocks\.0\.hook_mlp_out holds a codebook this model does not hold, not the one at blocks\.0\.hook_mlp_out"),
    ("run: one intervention, not a list", lambda e: e.cb.run(e.ids, ForceCodes(MLP0, e.layer, (3,))), TypeError, r"interventions must be a list of ForceCodes .*wrap one in a list"),
    ("run: intervention without a site", lambda e: e.cb.run(e.ids, ["force"]), TypeError, r"each intervention needs a site name"),
    ("CodebookModel: no layers", lambda e: CodebookModel(e.model, {}), TypeError, r"CodebookModel takes a non-empty dict site -> CodebookLayer"),
    ("CodebookModel: not a layer", lambda e: CodebookModel(e.model, {MLP0: "layer"}), TypeError, r"CodebookModel at blocks\.0\.hook_mlp_out: layer must be the CodebookLayer"),
    # ---- code search
    ("collect_codes: batch_size 0", lambda e: collect_codes(e.cb, e.ids, batch_size=0), ValueError, r"batch_size must be an integer >= 1; got 0"),
    ("collect_codes: not a CodebookModel", lambda e: collect_codes(e.model, e.ids), TypeError, r"collect_codes takes a CodebookModel"),
    ("rank_codes: code = n_codes", lambda e: rank_codes(torch.full((2, 5, 1), 40), torch.ones(2, 5, dtype=torch.bool), 40), ValueError, r"codes must lie in \[0, n_codes=40\), got 40\.\.40"),
    ("rank_codes: shapes disagree", lambda e: rank_codes(torch.zeros(2, 5, 1, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), 40), ValueError, r"codes \[B, T, \.\.\.\] = \[2, 5, 1\] must match the targets/labels \[B, T\] = \[2, 4\]"),
    ("rank_codes: float codes", lambda e: rank_codes(torch.zeros(2, 5, 1), torch.ones(2, 5, dtype=torch.bool), 40), ValueError, r"codes must be an integer tensor \[B, T, K\]"),
    ("best_code_per_label: n_codes str", lambda e: best_code_per_label(torch.zeros(2, 5, 1, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), "40"), TypeError, r"n_codes must be an integer >= 1; got str"),
    ("best_code_per_label: label >= n_labels", lambda e: best_code_per_label(torch.zeros(2, 5, 1, dtype=torch.long), torch.full((2, 5), 3), 40, n_labels=2), ValueError, r"labels must lie in \[0, n_labels=2\) or be -1"),
    ("regex_targets: bad pattern", lambda e: regex_targets([["a", "b"]], "("), ValueError, r"pattern '\(' is not a regular expression"),
    ("regex_targets: empty texts", lambda e: regex_targets([], "a"), ValueError, r"texts must be a non-empty list of sequences"),
    ("NeuronBaseline: NaN acts", lambda e: NeuronBaseline(torch.full((4, 3), NAN)), ValueError, r"acts hold 12 non-finite values \(NaN or inf\)"),
    ("neuron_precision_at_recall: recall str", lambda e: neuron_precision_at_recall(torch.randn(4, 3), torch.ones(4), "0.5"), ValueError, r"recall must lie in \(0, 1\], got '0\.5'"),
    ("neuron_precision_at_recall: lengths", lambda e: neuron_precision_at_recall(torch.randn(4, 3), torch.ones(5), 0.5), ValueError, r"target has 5 entries for 4 rows of activations"),
    # ---- InversionView sample()
    ("sample: epsilon 0", lambda e: _sample(e, epsilon=0.0), ValueError, r"epsilon must be a finite number > 0; got 0\.0"),
    ("sample: epsilon NaN", lambda e: _sample(e, epsilon=NAN), ValueError, r"epsilon must be a finite number > 0; got nan"),
    ("sample: epsilon negative", lambda e: _sample(e, epsilon=-0.1), ValueError, r"epsilon must be a finite number > 0"),
    ("sample: empty temperatures", lambda e: _sample(e, temperatures=()), ValueError, r"temperatures must be a non-empty sequence of numbers > 0"),
    ("sample: scalar temperatures", lambda e: _sample(e, temperatures=1.0), ValueError, r"temperatures must be a non-empty sequence .*got 1\.0"),
    ("sample: negative temperature", lambda e: _sample(e, temperatures=(1.0, -1.0)), ValueError, r"temperatures must all be finite numbers > 0, got \[1\.0, -1\.0\]"),
    ("sample: NaN temperature", lambda e: _sample(e, temperatures=(NAN,)), ValueError, r"temperatures must all be finite numbers > 0"),
    ("sample: n_per_temperature 0", lambda e: _sample(e, n_per_temperature=0), ValueError, r"n_per_temperature must be an integer >= 1; got 0"),
    ("sample: n_per_temperature float", lambda e: _sample(e, n_per_temperature=2.5), TypeError, r"n_per_temperature must be an integer >= 1; got float"),
    ("sample: negative noise", lambda e: _sample(e, noise=-0.1), ValueError, r"noise must be a finite number >= 0; got -0\.1"),
    ("sample: NaN noise", lambda e: _sample(e, noise=NAN), ValueError, r"noise must be a finite number >= 0; got nan"),
    ("sample: unknown metric", lambda e: _sample(e, metric="manhattan"), ValueError, r"metric must be one of \('euclidean', 'cosine'\), got 'manhattan'"),
    ("sample: seed str", lambda e: _sample(e, seed="0"), TypeError, r"seed must be an integer; got str"),
    ("sample: out-of-vocabulary query", lambda e: _sample(e, query=torch.tensor([BOS, 99])), ValueError, r"query token id 99 is outside the vocabulary: allowed are 0\.\.63"),
    ("sample: negative query id", lambda e: _sample(e, query=torch.tensor([BOS, -1])), ValueError, r"query token id -1 is outside the vocabulary: allowed are 0\.\.63"),
    ("sample: query longer than n_ctx", lambda e: _sample(e, query=torch.tensor([BOS, 1, 2, 3, 4])), ValueError, r"query has 5 tokens, longer than the decoder's context n_ctx=3"),
    ("sample: batched query", lambda e: _sample(e, query=torch.tensor([[BOS, 1, 2], [BOS, 2, 3]])), ValueError, r"query must be one input \[T\] \(or \[1, T\]\), got shape \[2, 3\]"),
    ("sample: float query", lambda e: _sample(e, query=torch.tensor([1.0, 2.0])), ValueError, r"query must be integer token ids \[T\], got dtype torch\.float32"),
    ("sample: text query", lambda e: _sample(e, query="w1 w2"), TypeError, r"query must be token ids \[T\] .*not a string"),
    ("sample: empty query", lambda e: _sample(e, query=torch.tensor([], dtype=torch.long)), ValueError, r"query is empty; give at least one token"),
    ("sample: position float", lambda e: _sample(e, position=1.5), TypeError, r"position must be an integer; got float 1\.5"),
    ("sample: position out of range", lambda e: _sample(e, position=3), ValueError, r"position 3 is outside the query input of 3 tokens; allowed 0\.\.2"),
    ("sample: NaN z", lambda e: sample(e.dec, e.model, SITE, z=torch.full((32,), NAN)), ValueError, r"z must be a non-empty finite activation; it holds 32 NaN/inf"),
    ("sample: batched z", lambda e: sample(e.dec, e.model, SITE, z=torch.randn(2, 32)), ValueError, r"z must be one activation \[D\] \(or \[1, D\]\), got shape \[2, 32\]"),
    ("sample: not a decoder", lambda e: sample("decoder", e.model, SITE, query=e.q, position=1), TypeError, r"decoder must be an InversionDecoder, got str"),
    ("sample: site not a name", lambda e: sample(e.dec, e.model, 3, query=e.q, position=1), TypeError, r"site must be a site name \(str\) or a FeatureSite, got int"),
    ("generate: n 0", lambda e: generate(e.dec, torch.randn(32), SITE, 0), ValueError, r"n must be an integer >= 1; got 0"),
    ("generate: temperature inf", lambda e: generate(e.dec, torch.randn(32), SITE, 2, temperature=math.inf), ValueError, r"temperature must be > 0 \(and finite\), got inf"),
    ("token_logprobs: ids out of vocab", lambda e: token_logprobs(e.dec, torch.tensor([[BOS, 70]]), torch.randn(32), SITE), ValueError, r"ids must lie in 0\.\.63 with at most n_ctx=3 positions"),
    ("query_activation: position float", lambda e: query_activation(e.model, e.q, SITE, 1.0), TypeError, r"position must be an integer; got float"),
    ("query_activation: batched ids", lambda e: query_activation(e.model, e.ids, SITE, 1), ValueError, r"query must be one input \[T\]"),
    ("query_activation: latent at a plain site", lambda e: query_activation(e.model, e.q, SITE, 1, latent=2), ValueError, r"latent is for feature sites"),
    ("query_activation: latent out of range", lambda e: query_activation(e.model, e.q, e.fs, 1, latent=16), ValueError, r"latent must be an integer in \[0, 15\]; got 16"),
    ("strongest_latent: plain site", lambda e: strongest_latent(e.model, e.q, SITE, 1), TypeError, r"strongest_latent needs a FeatureSite"),
    ("feature_query: index float", lambda e: feature_query(torch.randn(4, 32), 1.5, 1.0), TypeError, r"index must be an integer; got float 1\.5"),
    ("feature_query: scale NaN", lambda e: feature_query(torch.randn(4, 32), 1, NAN), ValueError, r"scale must be a finite number; got nan"),
    ("feature_query: W_dec 1-D", lambda e: feature_query(torch.randn(32), 1, 1.0), ValueError, r"W_dec must be a float tensor \[F, D\]"),
    ("feature_query: b_dec shape", lambda e: feature_query(torch.randn(4, 32), 1, 1.0, torch.zeros(31)), ValueError, r"b_dec must be None or a tensor \[D\] = \[32\]"),
    ("panel_callables: n_per_temperature 0", lambda e: panel_callables(e.dec, e.model, ["a"], str.split, n_per_temperature=0), ValueError, r"n_per_temperature must be an integer >= 1"),
    ("panel_callables: vocab str", lambda e: panel_callables(e.dec, e.model, "abc", str.split), TypeError, r"vocab must be a non-empty list of token strings"),
    ("panel_callables: encode not callable", lambda e: panel_callables(e.dec, e.model, ["a"], None), TypeError, r"encode must be a callable text -> token ids"),
    ("panel tokenize: not text", lambda e: panel_callables(e.dec, e.model, ["a"], lambda t: [0])[1](5), TypeError, r"text must be a string, got int"),
    ("panel tokenize: id outside vocab", lambda e: panel_callables(e.dec, e.model, ["a"], lambda t: [3])[1]("x"), ValueError, r"gave ids \[3\] outside the vocab list \(allowed 0\.\.0\)"),
    # ---- probe: PairSource, FeatureSite, distance, read_sites
    ("PairSource: sites a str", lambda e: PairSource(e.model, SITE, _inputs), TypeError, r"PairSource: sites must be a non-empty list of site names and FeatureSites"),
    ("PairSource: no sites", lambda e: PairSource(e.model, [], _inputs), TypeError, r"PairSource: sites must be a non-empty list"),
    ("PairSource: site int", lambda e: PairSource(e.model, [3], _inputs), TypeError, r"site must be a site name \(str\) or a FeatureSite, got int"),
    ("PairSource: duplicate sites", lambda e: PairSource(e.model, [SITE, SITE], _inputs), ValueError, r"site names must be distinct"),
    ("PairSource: inputs not callable", lambda e: PairSource(e.model, [SITE], torch.zeros(2, 3)), TypeError, r"inputs must be a callable \(n, seed\) -> token ids"),
    ("PairSource: eos_id float", lambda e: PairSource(e.model, [SITE], _inputs, eos_id=1.0), TypeError, r"eos_id must be an integer >= 0"),
    ("PairSource.batch: n 0", lambda e: PairSource(e.model, [SITE], _inputs).batch(0, 0), ValueError, r"n must be an integer >= 1; got 0"),
    ("PairSource.batch: n float", lambda e: PairSource(e.model, [SITE], _inputs).batch(2.5, 0), TypeError, r"n must be an integer >= 1; got float"),
    ("PairSource.batch: float inputs", lambda e: PairSource(e.model, [SITE], lambda n, s: torch.zeros(n, 3)).batch(2, 0), ValueError, r"inputs\(2, seed\) must return integer token ids \[2, T\]"),
    ("PairSource.batch: NaN site_weights", lambda e: PairSource(e.model, [SITE, MLP0], _inputs).batch(2, 0, site_weights=[NAN, 1.0]), ValueError, r"site_weights must be 2 non-negative numbers, finite and not all zero"),
    ("PairSource.batch: bad query_mask", lambda e: PairSource(e.model, [SITE], _inputs, query_mask=lambda ids: ids).batch(2, 0), ValueError, r"query_mask\(ids\) must return a bool tensor of the ids' shape"),
    ("FeatureSite.from_sae: not an SAE", lambda e: FeatureSite.from_sae(object(), SITE), TypeError, r"from_sae takes an SAE with encode\(x\) and W_dec \[F, D\]"),
    ("FeatureSite.from_sae: site int", lambda e: FeatureSite.from_sae(e.sae, 3), TypeError, r"FeatureSite: name and site must be strings"),
    ("FeatureSite.from_codebook: not a layer", lambda e: FeatureSite.from_codebook("layer", SITE), TypeError, r"from_codebook takes a CodebookLayer, got str"),
    ("FeatureSite: W_dec 1-D", lambda e: FeatureSite("f", SITE, e.sae.encode, torch.randn(32)), ValueError, r"W_dec must be a non-empty float tensor \[F, D\]"),
    ("FeatureSite: encode not callable", lambda e: FeatureSite("f", SITE, None, torch.randn(4, 32)), TypeError, r"encode must be callable"),
    ("FeatureSite.restrict: latent out of range", lambda e: e.fs.restrict(torch.randn(2, 3, 32), torch.tensor([0, 16])), ValueError, r"latents must lie in 0\.\.15, got 0\.\.16"),
    ("FeatureSite.restrict: float latents", lambda e: e.fs.restrict(torch.randn(2, 3, 32), torch.tensor([0.0, 1.0])), ValueError, r"latents must be an integer tensor \[2\]"),
    ("distance: NaN z", lambda e: distance(torch.tensor([NAN, 1.0]), torch.randn(2, 3, 2)), ValueError, r"z holds 1 non-finite values \(NaN or inf\)"),
    ("distance: acts 2-D", lambda e: distance(torch.randn(2), torch.randn(3, 2)), ValueError, r"acts must be a float tensor \[B, T, D\], got torch\.float32 \[3, 2\]"),
    ("distance: mask shape", lambda e: distance(torch.randn(2), torch.randn(2, 3, 2), torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must be a bool tensor \[B, T\] = \[2, 3\]"),
    ("distance: z a list", lambda e: distance([1.0, 2.0], torch.randn(2, 3, 2)), ValueError, r"z must be a float tensor \[D\] or \[B, D\], got list"),
    ("distance: metric not str", lambda e: distance(torch.randn(2), torch.randn(2, 3, 2), metric=2), ValueError, r"metric must be one of"),
    ("read_sites: one name, not a list", lambda e: read_sites(e.model, e.ids, SITE), TypeError, r"names must be a list of site names \(str\)"),
]  # fmt: skip


def _raised_in_nbfeatures(excinfo) -> bool:
    tb = excinfo.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PKG)


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_from_our_own_raise(env, call, exc, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=pattern) as excinfo:
            call(env)
    assert _raised_in_nbfeatures(excinfo), f"raised outside nbfeatures: {excinfo.traceback[-1]}"


def test_unknown_hub_id_fails_fast_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"'nbfeatures-test/no-such-model-x7' is not a zoo model .*not in the local hub cache; HF_HUB_OFFLINE is set") as excinfo:
        zoo.load_model("nbfeatures-test/no-such-model-x7")
    assert time.monotonic() - start < 5 and _raised_in_nbfeatures(excinfo)


def test_unknown_hub_id_fails_fast_without_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"the hub cannot be reached \(no network\); set HF_HUB_OFFLINE=1") as excinfo:
        zoo.wrap("nbfeatures-test/no-such-model-x7")
    assert time.monotonic() - start < 5 and _raised_in_nbfeatures(excinfo)


def test_good_input_still_works(env):
    """The checks do not refuse what was allowed: codes as a list, blocking n - k codes, a [1, T] or list query,
    temperatures as a tensor, a folder without tokenizer for callers that need only the module."""
    assert ForceCodes(MLP0, env.layer, [3]).codes == (3,)
    block = BlockCodes(MLP0, env.layer, tuple(range(39)))
    out = env.cb.run(env.ids, [block])
    assert (out.outputs[MLP0].codes == 39).all()
    z = query_activation(env.model, env.q[None], SITE, 1)
    assert z.shape == (32,)
    out = sample(env.dec, env.model, SITE, query=env.q.tolist(), position=1, temperatures=torch.tensor([1.0]), n_per_temperature=2)
    assert len(out.tokens) == 2 and out.temperature.tolist() == [1.0, 1.0]
    hf, tok = zoo.load_pretrained(env.no_tok)  # callers that need only the module still get it
    assert tok is None and hf is not None
