"""Bad input to features, metrics, data, plots and panels: a clear error from our own `raise`, naming what was wrong
and what is allowed; panels show a failing callback's message and stay usable; LiveCurves never stops a training loop.

Each row of CASES is (id, call, exception type, regex); the regex names the argument and what is allowed. Every
case also checks that the innermost frame of the traceback is a `raise` statement in the nbfeatures package, so a
torch / numpy / datasets error that merely passed through our code does not count.
"""

import math
import pathlib
import traceback

import numpy as np
import pytest
import torch

import nbfeatures
import nbfeatures.widgets.figure as figure_mod
from nbfeatures import metrics as M
from nbfeatures import plots as P
from nbfeatures.data import (Counting, StoryCorpus, TokFSM, count_accuracy, stories_dataset, story_windows, token_dataset,
                             tokfsm_dataset, transition_accuracy)
from nbfeatures.evals import compare_density, evaluate_sae
from nbfeatures.features import sparse_from_topk, summarize_features
from nbfeatures.steering import edits_fn, steering_fn
from nbfeatures.widgets import FeatureGallery, FSMPanel, InversionPanel, LiveCurves, SteeringPanel

PKG = pathlib.Path(nbfeatures.__file__).resolve().parent
V = ["a", "b", "c"]
ACTS = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
TOKS = torch.tensor([0, 1, 2, 0])
NAN = float("nan")


def summary(**kw):
    return summarize_features(ACTS, TOKS, V, **kw)


def story_tok():
    return StoryCorpus().tokenizer()


def ds(tmp, name, **kw):
    return token_dataset(tmp / name, story_tok(), cache_dir=str(tmp / "cache"), **kw)


FSM_SITES = ["mlp0"]

CASES = [
    # ------------------------------------------------------------ summarize_features / sparse_from_topk / cards
    ("acts negative", lambda _: summarize_features(-ACTS, TOKS, V), ValueError, r"acts must be >= 0"),
    ("acts NaN", lambda _: summarize_features(ACTS.masked_fill(ACTS > 0.5, NAN), TOKS, V), ValueError, r"acts holds .*NaN or inf.*finite numbers >= 0"),
    ("acts inf", lambda _: summarize_features(ACTS.masked_fill(ACTS > 0.5, math.inf), TOKS, V), ValueError, r"acts holds .*NaN or inf"),
    ("acts sparse negative", lambda _: summarize_features((-ACTS).to_sparse(), TOKS, V), ValueError, r"acts must be >= 0"),
    ("acts a string", lambda _: summarize_features("abc", TOKS, V), TypeError, r"acts must be activations \[N, F\]"),
    ("acts 1-d", lambda _: summarize_features(ACTS[:, 0], TOKS, V), ValueError, r"acts must be \[N, F\] \(or \[B, T, F\]\)"),
    ("acts/tokens lengths", lambda _: summarize_features(ACTS, TOKS[:3], V), ValueError, r"acts must be \[N, F\].*same N=3 tokens"),
    ("token id past decode", lambda _: summarize_features(ACTS, torch.tensor([0, 1, 5, 0]), V), ValueError, r"tokens hold id 5 but decode lists 3 strings \(ids must be < 3\)"),
    ("token id negative", lambda _: summarize_features(ACTS, torch.tensor([0, -1, 2, 0]), V), ValueError, r"tokens must be ids >= 0"),
    ("token ids float", lambda _: summarize_features(ACTS, TOKS.float(), V), TypeError, r"tokens must be integer ids"),
    ("tokens 3-d", lambda _: summarize_features(ACTS, TOKS.reshape(1, 2, 2), V), ValueError, r"tokens must be \[N\] or \[B, T\]"),
    ("decode an int", lambda _: summarize_features(ACTS, TOKS, 5), TypeError, r"decode must be a callable .* or a list of token strings"),
    ("decode a str", lambda _: summarize_features(ACTS, TOKS, "abc"), TypeError, r"decode must be a callable"),
    ("seq float", lambda _: summary(seq=torch.rand(4)), TypeError, r"seq must be integer ids"),
    ("pos wrong length", lambda _: summary(pos=torch.arange(3)), ValueError, r"pos must have N=4 entries"),
    ("n_top negative", lambda _: summary(n_top=-1), ValueError, r"n_top must be an int >= 1"),
    ("n_top a string", lambda _: summary(n_top="5"), TypeError, r"n_top must be an int >= 1"),
    ("bins zero", lambda _: summary(bins=0), ValueError, r"bins must be an int >= 1"),
    ("n_quantiles zero", lambda _: summary(n_quantiles=0), ValueError, r"n_quantiles must be an int >= 1"),
    ("per_quantile float", lambda _: summary(per_quantile=2.5), TypeError, r"per_quantile must be an int >= 0"),
    ("chunk_elements zero", lambda _: summary(chunk_elements=0), ValueError, r"chunk_elements must be an int >= 1"),
    ("context negative", lambda _: summary(context=(-1, 2)), ValueError, r"context\[0\] must be an int >= 0"),
    ("context not a pair", lambda _: summary(context=5), ValueError, r"context must be \(tokens before, tokens after\)"),
    ("seed negative", lambda _: summary(seed=-1), ValueError, r"seed must be an int >= 0"),
    ("W_U 1-d", lambda _: summary(W_dec=torch.rand(3, 4), W_U=torch.rand(4)), ValueError, r"W_U must be a \[D, V\] tensor"),
    ("W_U wider than decode", lambda _: summary(W_dec=torch.rand(3, 4), W_U=torch.rand(4, 7)), ValueError, r"W_U \[D, V\] has V=7 columns but decode lists 3"),
    ("W_dec without W_U", lambda _: summary(W_dec=torch.rand(3, 4)), ValueError, r"output tokens need both W_dec \[F, D\] and W_U \[D, V\]"),
    ("labels all -1", lambda _: summary(labels=torch.full((4,), -1)), ValueError, r"labels \[N\] hold no class id >= 0"),
    ("labels NaN", lambda _: summary(labels=torch.full((4, 2), NAN)), ValueError, r"labels \[N, C\] hold NaN; indicators must be 0 / 1"),
    ("labels float ids", lambda _: summary(labels=torch.rand(4)), ValueError, r"labels \[N\] must be integer class ids"),
    ("card float id", lambda _: summary().card(1.5), TypeError, r"feature must be an int id in 0..2"),
    ("card string id", lambda _: summary().card("x"), TypeError, r"feature must be an int id in 0..2"),
    ("card out of range", lambda _: summary().card(3), ValueError, r"feature 3 is out of range.*\(0..2\)"),
    ("column negative", lambda _: summary().column(-1), ValueError, r"feature -1 is out of range"),
    ("topk shapes differ", lambda _: sparse_from_topk(torch.rand(4, 2), torch.zeros(4, 3, dtype=torch.long), 3), ValueError, r"acts_NK and indices_NK must both be \[N, K\]"),
    ("topk id past d_sae", lambda _: sparse_from_topk(torch.rand(4, 2), torch.tensor([[0, 5]] * 4), 3), ValueError, r"indices_NK must be latent ids in \[0, d_sae=3\)"),
    ("topk float ids", lambda _: sparse_from_topk(torch.rand(4, 2), torch.rand(4, 2), 3), TypeError, r"indices_NK must be integer latent ids"),
    ("topk d_sae zero", lambda _: sparse_from_topk(torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long), 0), ValueError, r"d_sae must be an int >= 1"),
    # ------------------------------------------------------------ metrics
    ("l0 no tokens", lambda _: M.l0(torch.rand(0, 3)), ValueError, r"latents_NF must hold at least one token"),
    ("l0 NaN", lambda _: M.l0(torch.full((2, 3), NAN)), ValueError, r"latents_NF holds .*NaN.*latents must be numbers"),
    ("density 1-d", lambda _: M.feature_density(torch.rand(5)), ValueError, r"latents_NF must have at least 2 dimension"),
    ("mse shapes", lambda _: M.mse(torch.rand(4, 3), torch.rand(4, 2)), ValueError, r"x_hat and x must have the same shape"),
    ("mse broadcast", lambda _: M.mse(torch.rand(4, 3), torch.rand(3)), ValueError, r"x_hat and x must have the same shape, got \[4, 3\] and \[3\]"),
    ("mse NaN", lambda _: M.mse(torch.full((2, 2), NAN), torch.rand(2, 2)), ValueError, r"x_hat holds .*NaN or inf.*finite values"),
    ("nmse shapes", lambda _: M.nmse(torch.rand(4, 3), torch.rand(5, 3)), ValueError, r"x_hat and x must have the same shape"),
    ("fvu shapes", lambda _: M.fvu(torch.rand(4, 3), torch.rand(4, 2)), ValueError, r"x_hat and x must have the same shape"),
    ("fvu inf", lambda _: M.fvu(torch.rand(4, 3), torch.full((4, 3), math.inf)), ValueError, r"x holds .*NaN or inf"),
    ("fvu a list", lambda _: M.fvu([1.0], [1.0]), TypeError, r"x_hat must be a torch tensor \(or numpy array\)"),
    ("l2_ratio shapes", lambda _: M.l2_ratio(torch.rand(4, 3), torch.rand(2, 3)), ValueError, r"x_hat and x must have the same shape"),
    ("ce tokens shape", lambda _: M.cross_entropy(torch.rand(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)), ValueError, r"tokens_BT must be \[B, T\] = \[2, 5\]"),
    ("ce token past V", lambda _: M.cross_entropy(torch.rand(2, 5, 7), torch.full((2, 5), 7)), ValueError, r"tokens_BT must be ids in \[0, V=7\)"),
    ("ce logits 2-d", lambda _: M.cross_entropy(torch.rand(5, 7), torch.zeros(5, dtype=torch.long)), ValueError, r"logits_BTV must have at least 3 dimension"),
    ("ce float tokens", lambda _: M.cross_entropy(torch.rand(2, 5, 7), torch.rand(2, 5)), TypeError, r"tokens_BT must be integer token ids"),
    ("ce mask shape", lambda _: M.cross_entropy(torch.rand(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 3)), ValueError, r"mask_BT must be \[B, T\] = \[2, 5\]"),
    ("ce NaN logits", lambda _: M.cross_entropy(torch.full((1, 3, 4), NAN), torch.zeros(1, 3, dtype=torch.long)), ValueError, r"logits_BTV holds NaN or \+inf; logits must be finite"),
    ("ce one position", lambda _: M.cross_entropy(torch.rand(1, 1, 4), torch.zeros(1, 1, dtype=torch.long)), ValueError, r"cross_entropy needs T >= 2 positions"),
    ("ce_recovered NaN", lambda _: M.ce_recovered(NAN, 1.0, 2.0), ValueError, r"ce_clean must be a finite number"),
    ("ce_recovered str", lambda _: M.ce_recovered(1.0, "1", 2.0), TypeError, r"ce_sae must be a real number"),
    ("kl shapes", lambda _: M.kl_div(torch.rand(2, 5), torch.rand(2, 6)), ValueError, r"logits_clean and logits_other must have the same shape"),
    ("log10 negative density", lambda _: M.log10_density(torch.tensor([-0.5, 0.2])), ValueError, r"density_F must be a non-empty tensor of firing rates in \[0, 1\]"),
    ("dead density > 1", lambda _: M.dead_fraction(torch.tensor([2.0])), ValueError, r"density_F must be .*firing rates in \[0, 1\]"),
    ("dense threshold 2", lambda _: M.dense_fraction(torch.tensor([0.2]), threshold=2), ValueError, r"threshold must lie in \[0, 1\)"),
    ("recovery D differs", lambda _: M.recovery(torch.rand(3, 4), torch.rand(5, 6)), ValueError, r"need true_CD \[C, D\] and W_dec_FD \[F, D\] with the same D"),
    ("precision_recall N differs", lambda _: M.precision_recall(torch.rand(4, 3), torch.rand(5, 2)), ValueError, r"fires_NF \[N, F\] and labels_NC \[N, C\] over the same N"),
    ("precision_recall negative", lambda _: M.precision_recall(-torch.rand(4, 3), torch.ones(4, 2)), ValueError, r"fires_NF must be >= 0"),
    ("power law negative y", lambda _: M.fit_power_law([1.0, -2.0, 3.0], d=[1, 2, 4]), ValueError, r"y must hold positive finite numbers"),
    ("power law NaN y", lambda _: M.fit_power_law([1.0, NAN, 3.0], d=[1, 2, 4]), ValueError, r"y must hold positive finite numbers"),
    ("power law lengths", lambda _: M.fit_power_law([1.0, 2.0, 3.0], d=[1, 2]), ValueError, r"d must be a flat sequence with one value per point of y \(3\)"),
    ("power law strings", lambda _: M.fit_power_law(["a", "b"], d=[1, 2]), TypeError, r"y must be a sequence of positive numbers"),
    # ------------------------------------------------------------ TokFSM
    ("fsm sample 0", lambda _: TokFSM().sample(0), ValueError, r"n must be an int >= 1, got 0"),
    ("fsm sample -3", lambda _: TokFSM().sample(-3), ValueError, r"n must be an int >= 1, got -3"),
    ("fsm sample float", lambda _: TokFSM().sample(2.5), TypeError, r"n must be an int >= 1, got float"),
    ("fsm sample str", lambda _: TokFSM().sample("3"), TypeError, r"n must be an int >= 1, got str"),
    ("fsm sample seed -1", lambda _: TokFSM().sample(2, seed=-1), ValueError, r"seed must be an int >= 0"),
    ("fsm sample_states 0", lambda _: TokFSM().sample_states(0), ValueError, r"n must be an int >= 1"),
    ("fsm n_states str", lambda _: TokFSM(n_states="100"), TypeError, r"n_states must be an int"),
    ("fsm n_states 1", lambda _: TokFSM(n_states=1), ValueError, r"n_states must be in \[2, 10000\]"),
    ("fsm seed -1", lambda _: TokFSM(seed=-1), ValueError, r"seed must be an int >= 0"),
    ("fsm seq_len float", lambda _: TokFSM(seq_len=128.0), TypeError, r"seq_len must be an int"),
    ("fsm encode state 100", lambda _: TokFSM().encode([100]), ValueError, r"states must be in \[0, 100\)"),
    ("fsm encode float", lambda _: TokFSM().encode([1.5]), TypeError, r"states must be integer"),
    ("fsm decode float", lambda _: TokFSM().decode([1.5]), TypeError, r"tokens must be integer"),
    ("fsm text id 11", lambda _: TokFSM().text([11, 3]), ValueError, r"tokens must be in \[0, 11\)"),
    ("fsm transition n 0", lambda _: transition_accuracy(lambda ids: torch.rand(*ids.shape, 11), n=0), ValueError, r"n must be an int >= 1"),
    ("fsm transition temperature", lambda _: transition_accuracy(lambda ids: torch.rand(*ids.shape, 11), temperature=NAN), ValueError, r"temperature must be a finite number > 0"),
    ("fsm transition fsm", lambda _: transition_accuracy(lambda ids: ids, fsm="tokfsm"), TypeError, r"fsm must be a TokFSM"),
    # ------------------------------------------------------------ stories
    ("stories generate -1", lambda _: StoryCorpus().generate(-1), ValueError, r"n must be an int >= 1, got -1"),
    ("stories generate float", lambda _: StoryCorpus().generate(2.5), TypeError, r"n must be an int >= 1"),
    ("stories start -1", lambda _: StoryCorpus().generate(1, start=-1), ValueError, r"start must be an int >= 0"),
    ("stories story -1", lambda _: StoryCorpus().story(-1), ValueError, r"i must be an int >= 0"),
    ("stories seed -1", lambda _: StoryCorpus(seed=-1), ValueError, r"seed must be a non-negative int"),
    ("stories min_middle str", lambda _: StoryCorpus(min_middle="2"), TypeError, r"min_middle must be an int >= 1"),
    ("stories encode strings", lambda _: StoryCorpus().encode(["hello"]), TypeError, r"stories must be a list of Story objects"),
    ("stories labels id past vocab", lambda _: StoryCorpus().concept_labels(torch.tensor([[0, 10**6]])), ValueError, r"ids_BT must be in \[0, \d+\)"),
    ("stories labels id negative", lambda _: StoryCorpus().concept_labels(torch.tensor([[0, -5]])), ValueError, r"ids_BT must be in \[0, \d+\)"),
    ("stories labels 1-d", lambda _: StoryCorpus().concept_labels(torch.tensor([0, 1])), ValueError, r"ids_BT must be \[B, T\]"),
    ("stories topic_ids past vocab", lambda _: StoryCorpus().topic_ids(torch.tensor([[0, 10**6]])), ValueError, r"ids_BT must be in \[0, \d+\)"),
    ("stories topic_prompt 99", lambda _: StoryCorpus().topic_prompt(99), ValueError, r"topic must be an index in \[0, 10\)"),
    ("story_windows n_ctx 0", lambda _: story_windows(0, 2, n_ctx=0), ValueError, r"n_ctx must be an int >= 1"),
    ("story_windows too short", lambda _: story_windows(0, 1, n_ctx=100_000), ValueError, r"fewer than one window of n_ctx=100000"),
    # ------------------------------------------------------------ counting
    ("counting sample -1", lambda _: Counting().sample(-1), ValueError, r"n must be an int >= 1, got -1"),
    ("counting sample 0", lambda _: Counting().sample(0), ValueError, r"n must be an int >= 1, got 0"),
    ("counting sample float", lambda _: Counting().sample(2.0), TypeError, r"n must be an int >= 1"),
    ("counting n_letters str", lambda _: Counting(n_letters="12"), TypeError, r"n_letters must be an int >= 1"),
    ("counting max_count 10", lambda _: Counting(max_count=10), ValueError, r"max_count must be in \[1, 9\]"),
    ("counting text id past vocab", lambda _: Counting().text([0, 99]), ValueError, r"ids must be in \[0, 25\)"),
    ("counting parse 2-d", lambda _: Counting().parse([[0, 1]]), ValueError, r"ids must be one sequence \[T\]"),
    ("counting digit 10", lambda _: Counting().digit_id(10), ValueError, r"d must be a digit in \[0, 9\]"),
    ("counting accuracy n 0", lambda _: count_accuracy(lambda ids: torch.rand(*ids.shape, 30), n=0), ValueError, r"n must be an int >= 1"),
    ("counting accuracy logits", lambda _: count_accuracy(lambda ids: torch.rand(3, 4), n=4), ValueError, r"logits_fn must map ids \[B, T\].*to logits \[B, T, V\] with V >= 25"),
    # ------------------------------------------------------------ datasets glue
    ("tokfsm_dataset -1", lambda _: tokfsm_dataset(-1), ValueError, r"n must be an int >= 1"),
    ("tokfsm_dataset fsm", lambda _: tokfsm_dataset(2, fsm=Counting()), TypeError, r"fsm must be a TokFSM"),
    ("stories_dataset 0", lambda _: stories_dataset(0), ValueError, r"n must be an int >= 1, got 0"),
    ("stories_dataset corpus", lambda _: stories_dataset(2, corpus="stories"), TypeError, r"corpus must be a StoryCorpus"),
    ("token_dataset n -1", lambda _: token_dataset("stories", n=-1), ValueError, r"n must be an int >= 1"),
    ("token_dataset empty txt", lambda tmp: ds(tmp, "empty.txt"), ValueError, r"local files must hold text; these are empty: \['empty.txt'\]"),
    ("token_dataset malformed jsonl", lambda tmp: ds(tmp, "bad.jsonl"), ValueError, r"could not read \['bad.jsonl'\] as json .*each file must be well-formed"),
    ("token_dataset number column", lambda tmp: ds(tmp, "numbers.jsonl"), ValueError, r"text_column 'text' holds int64 values, not text; the text columns are \['note'\]"),
    ("token_dataset blank rows", lambda tmp: ds(tmp, "blank.jsonl"), ValueError, r"no text to tokenise: every row of 'text'"),
    ("token_dataset missing column", lambda tmp: ds(tmp, "ok.jsonl", text_column="body"), ValueError, r"text_column 'body' is not in the dataset; its columns are \['text'\]"),
    ("token_dataset missing file", lambda tmp: ds(tmp, "nope.jsonl"), ValueError, r"files not found: \[.*nope.jsonl'\]"),
    ("token_dataset max_length 0", lambda tmp: ds(tmp, "ok.jsonl", max_length=0), ValueError, r"max_length must be an int >= 1"),
    ("token_dataset source int", lambda _: token_dataset(5, story_tok()), TypeError, r"source must be 'stories', 'tokfsm', a file or folder path"),
    ("token_dataset empty list", lambda _: token_dataset([], story_tok()), TypeError, r"source must be .*a non-empty list of files"),
    ("token_dataset no tokenizer", lambda tmp: token_dataset(tmp / "ok.jsonl"), ValueError, r"needs a tokenizer \(an object or a name/path"),
    ("token_dataset tokenizer int", lambda tmp: token_dataset(tmp / "ok.jsonl", 5), TypeError, r"tokenizer must be a tokenizer object"),
    ("token_dataset extension", lambda tmp: token_dataset(tmp / "notes.xyz", story_tok()), ValueError, r"local files must share one type among \['.csv'"),
    # ------------------------------------------------------------ evals / steering argument checks (no model needed to fail)
    ("evaluate_sae batch_size 0", lambda _: evaluate_sae(None, None, "blocks.0.hook_resid_post", [[1, 2]], batch_size=0), ValueError, r"batch_size must be an int >= 1"),
    ("evaluate_sae site int", lambda _: evaluate_sae(None, None, 3, [[1, 2]]), TypeError, r"site must be a site name \(str\)"),
    ("evaluate_sae downstream str", lambda _: evaluate_sae(None, None, "a", [[1]], downstream="blocks.1.hook_resid_pre"), TypeError, r"downstream must be a list of site names"),
    ("compare_density acts NaN", lambda _: compare_density({"x": torch.nn.Identity()}, torch.full((2, 3), NAN)), ValueError, r"acts_ND holds .*NaN or inf.*must be finite"),
    ("compare_density acts 1-d", lambda _: compare_density({"x": torch.nn.Identity()}, torch.rand(3)), ValueError, r"acts_ND must be a \[N, D\] tensor"),
    ("compare_density batch 0", lambda _: compare_density({"x": torch.nn.Identity()}, torch.rand(2, 3), batch_size=0), ValueError, r"batch_size must be an int >= 1"),
    ("compare_density list", lambda _: compare_density([torch.nn.Identity()], torch.rand(2, 3)), ValueError, r"needs a dict of at least one dictionary"),
    ("edits_fn max_new_tokens 0", lambda _: edits_fn(None, lambda f, s: [], max_new_tokens=0), ValueError, r"max_new_tokens must be an int >= 1"),
    ("edits_fn make_edits", lambda _: edits_fn(None, [1, 2]), TypeError, r"make_edits must be a callable \(feature, strength\)"),
    ("steering_fn site int", lambda _: steering_fn(None, 3, torch.rand(2, 4)), TypeError, r"site must be a site name \(str\)"),
    # ------------------------------------------------------------ plots
    ("histogram NaN edge", lambda _: P.activation_histogram([1, 2], [0, 1, NAN]), ValueError, r"edges holds 1 NaN or inf.*finite numbers"),
    ("histogram edges count", lambda _: P.activation_histogram([1, 2], [0, 1]), ValueError, r"need len\(edges\) == len\(counts\) \+ 1"),
    ("output bars lengths", lambda _: P.output_tokens_bar(["a"], [1.0, 2.0], [], []), ValueError, r"pos_values must have 1 values"),
    ("next token k 0", lambda _: P.next_token_bars([0.5, 0.5], [0.5, 0.5], ["a", "b"], k=0), ValueError, r"k must be an int >= 1"),
    ("next token k str", lambda _: P.next_token_bars([0.5, 0.5], [0.5, 0.5], ["a", "b"], k="2"), TypeError, r"k must be an int >= 1"),
    ("next token NaN", lambda _: P.next_token_bars([NAN, 0.5], [0.5, 0.5], ["a", "b"]), ValueError, r"probs_before holds 1 NaN or inf"),
    ("overview lengths", lambda _: P.feature_overview([0.1, 0.2], [1.0]), ValueError, r"max_act must have 2 values"),
    ("overview ids", lambda _: P.feature_overview([0.1, 0.2], [1.0, 2.0], ids=[0]), ValueError, r"ids must have one entry per feature \(2\)"),
    ("unique labels ids", lambda _: P.unique_labels(["a", "a"], [1]), ValueError, r"ids must have one entry per token \(2\)"),
    ("ema NaN smoothing", lambda _: P.ema([1.0], NAN), ValueError, r"smoothing must lie in \[0, 1\)"),
    ("ema NaN values", lambda _: P.ema([1.0, NAN], 0.5), ValueError, r"y holds 1 NaN or inf value\(s\)"),
    ("curves ragged history", lambda _: P.training_curves({"loss": [1, 2], "step": [1]}), ValueError, r"history columns must all have one value per row"),
    ("curves cols 0", lambda _: P.training_curves({"loss": [1, 2]}, cols=0), ValueError, r"cols must be an int >= 1"),
    ("curves strings", lambda _: P.training_curves({"loss": ["a", "b"]}), ValueError, r"history column 'loss' must hold numbers"),
    ("curves unknown panel", lambda _: P.training_curves({"loss": [1.0]}, {"x": ["fvu"]}), ValueError, r"panels name metrics that are not in the history: \['fvu'\]"),
    ("next state NaN", lambda _: P.next_state_bars([NAN, 1.0], None, [0]), ValueError, r"before holds 1 NaN or inf"),
    ("next state edge", lambda _: P.next_state_bars([0.5, 0.5], None, [2]), ValueError, r"edges must be states in \[0, 2\)"),
    ("codes table float", lambda _: P.state_codes_table(["a"], [1.5], [2]), TypeError, r"first must hold ints >= 0"),
    ("codes table negative", lambda _: P.state_codes_table(["a"], [1], [-2]), ValueError, r"second must hold ints >= 0"),
    ("shaded lengths", lambda _: P.shaded_tokens(["a", "b"], [1.0], 1.0), ValueError, r"acts must have one value per token \(2\)"),
    ("generation steered", lambda _: P.generation_html(["a"], ["b"], [True]), ValueError, r"steered must have one entry per prompt and generated token \(1 \+ 1\)"),
    ("generation differs", lambda _: P.generation_html(["a"], ["b", "c"], None, "", [True]), ValueError, r"differs must have one entry per generated token \(2\)"),
    ("describe prompt_len -1", lambda _: P.describe_steered([True], -1), ValueError, r"prompt_len must be an int >= 0"),
    ("describe prompt_len past", lambda _: P.describe_steered([True], 3), ValueError, r"prompt_len must lie in \[0, 1\]"),
    ("inversion epsilon NaN", lambda _: P.inversion_samples([["a"]], [0.1], [[0.0]], [0], NAN), ValueError, r"epsilon must be a finite number"),
    ("inversion position past", lambda _: P.inversion_samples([["a"]], [0.1], [[0.0]], [5], 0.1), ValueError, r"position of sample 0 must lie in \[0, 1\)"),
    ("inversion distance NaN", lambda _: P.inversion_samples([["a"]], [NAN], [[0.0]], [0], 0.1), ValueError, r"distance holds 1 NaN or inf"),
    ("query position float", lambda _: P.query_html(["a"], 0.5), TypeError, r"position must be an int >= 0"),
    ("query position past", lambda _: P.query_html(["a"], 1), ValueError, r"position 1 is outside the query of 1 tokens; allowed 0..0"),
    ("shared position past", lambda _: P.shared_tokens([["a"]], [3], [True]), ValueError, r"position of sample 0 must lie in \[0, 1\)"),
    ("shared min_share 2", lambda _: P.shared_tokens([["a"]], [0], [True], min_share=2), ValueError, r"min_share must lie in \(0, 1\]"),
    ("shared lengths", lambda _: P.shared_tokens([["a"]], [0, 0], [True]), ValueError, r"tokens, position and inside need one entry per sample"),
    # ------------------------------------------------------------ panel constructors
    ("gallery not a summary", lambda _: FeatureGallery(object()), TypeError, r"FeatureGallery takes a FeatureSummary, or a table and card=callable"),
    ("gallery table columns", lambda _: FeatureGallery(summary().table[["density"]], card=lambda f: None), ValueError, r"needs columns density, max_act, mean_act.*missing \['max_act', 'mean_act'\]"),
    ("gallery card not callable", lambda _: FeatureGallery(summary().table, card=5), TypeError, r"card must be a callable feature id -> FeatureCard"),
    ("fsm panel n_codes 0", lambda _: FSMPanel(lambda s: {}, lambda s, f: [1.0], [[0]], FSM_SITES, n_codes=0), ValueError, r"n_codes must be an int >= 1"),
    ("fsm panel edges", lambda _: FSMPanel(lambda s: {}, lambda s, f: [1.0], [[3]], FSM_SITES, n_codes=4), ValueError, r"out_edges must hold states in \[0, 1\)"),
    ("fsm panel no states", lambda _: FSMPanel(lambda s: {}, lambda s, f: [], [], FSM_SITES, n_codes=4), ValueError, r"out_edges must list the successors of at least one state"),
    ("fsm panel probabilities", lambda _: FSMPanel(lambda s: {"mlp0": (0, 0)}, lambda s, f: [1.0, 0.0], [[0]], FSM_SITES, n_codes=4), ValueError, r"next_states returned 2 probabilities; expected one per state \(1\)"),
    ("inversion panel no tokens", lambda _: InversionPanel(lambda *a: None, lambda q: [], ["s"]), ValueError, r"tokenize returned no tokens for the query ''; it needs at least one"),
    ("inversion panel no sites", lambda _: InversionPanel(lambda *a: None, lambda q: ["<s>"], []), ValueError, r"sites must list at least one site"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_files")
    (tmp / "empty.txt").write_text("")
    (tmp / "bad.jsonl").write_text("{not json\n")
    (tmp / "numbers.jsonl").write_text('{"text": 5, "note": "a"}\n{"text": 7, "note": "b"}\n')
    (tmp / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    (tmp / "ok.jsonl").write_text('{"text": "the dragon"}\n')
    (tmp / "notes.xyz").write_text("x")
    return tmp


def assert_raised_by_us(excinfo) -> None:
    """The innermost frame is a `raise` statement in the nbfeatures package (not torch, numpy, datasets ...)."""
    last = traceback.extract_tb(excinfo.tb)[-1]
    assert pathlib.Path(last.filename).resolve().is_relative_to(PKG), f"raised in {last.filename}:{last.lineno}: {last.line}"
    assert last.line.lstrip().startswith("raise "), f"innermost frame is not a raise: {last.filename}:{last.lineno}: {last.line}"


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_from_our_own_raise(call, exc, pattern, files, monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", False)  # static figures: faster, same checks
    with pytest.raises(exc, match=pattern) as excinfo:
        call(files)
    assert type(excinfo.value) is exc or issubclass(type(excinfo.value), exc)
    assert_raised_by_us(excinfo)


def test_good_input_next_to_the_bad_still_works(files):
    """The checks do not refuse the inputs they sit next to."""
    s = summarize_features(ACTS, TOKS, V, W_dec=torch.rand(3, 4), W_U=torch.rand(4, 3), labels=torch.tensor([0, -1, 1, 0]))
    assert len(s) == 3 and s.card(np.int64(1)).feature == 1
    assert summarize_features(torch.zeros(4, 3, dtype=torch.bool), TOKS, lambda i: str(i)).table["density"].sum() == 0
    assert M.precision_recall(torch.rand(4, 3), torch.ones(4, 1, dtype=torch.bool))[0].shape == (3, 1)  # latents >= 0
    assert M.cross_entropy(torch.tensor([[[0.0, 0.0], [0.0, -math.inf]]]), torch.tensor([[0, 0]])) == pytest.approx(math.log(2))
    assert M.fvu(np.ones((2, 2)), np.ones((2, 2))) == 0.0
    assert TokFSM().decode([TokFSM().special_id, 1, 2]).tolist() == [12] and Counting().parse([0, 99]) is None
    assert len(ds(files, "ok.jsonl")) == 1


# ----------------------------------------------------------------------------- panels never swallow an error


def boom():
    raise ValueError("boom: x")


@pytest.fixture(params=[True, False], ids=["FigureWidget", "static"])
def figures(request, monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", request.param)


def test_gallery_shows_a_failing_card_and_stays_usable(figures):
    data = summary()
    gallery = FeatureGallery(data.table, card=lambda f: boom() if f == 2 else data.card(f), feature=0)
    assert "feature 0" in gallery.hist_fig.layout.title.text and gallery.status.value == ""
    with pytest.raises(ValueError, match="boom: x"):
        gallery.feature.value = 2
    assert "ValueError: boom: x" in gallery.status.value
    assert "feature 0" in gallery.hist_fig.layout.title.text  # the last good card stays on show
    gallery.feature.value = 1
    assert "feature 1" in gallery.hist_fig.layout.title.text and "feature 1" in gallery.cards.value
    assert gallery.status.value == ""


def test_inversion_panel_shows_a_failing_sample_and_stays_usable(figures):
    def sample(query, site, position, temperature):
        if temperature == 2.0:
            boom()
        d = [0.05 * temperature, 0.5]
        return {"tokens": [["<s>", "a"], ["<s>", "b"]], "distance": d, "position": [1, 1], "colour": [[0, 1], [0, -1]]}

    def tokenize(query):
        return boom() if query == "bad" else ["<s>", *query.split()]

    panel = InversionPanel(sample, tokenize, ["s"], query="a")
    panel.sample_button.click()
    assert list(panel.fig.data[1].x) == [0.05, 0.5]
    with pytest.raises(ValueError, match="boom: x"):
        panel.temperature.value = 2.0
    assert "ValueError: boom: x" in panel.status.value and list(panel.fig.data[1].x) == [0.05, 0.5]
    panel.epsilon.value = 0.3  # a redraw of the last good result still works
    assert "1 of 2 samples inside" in panel.status.value
    panel.temperature.value = 1.5
    assert list(panel.fig.data[1].x) == pytest.approx([0.075, 0.5]) and "samples inside" in panel.status.value
    with pytest.raises(ValueError, match="boom: x"):
        panel.query.value = "bad"
    assert "boom: x" in panel.status.value
    panel.query.value = "a b"
    assert panel.tokens == ["<s>", "a", "b"] and panel.position.value == 2 and "samples inside" in panel.status.value


def test_fsm_panel_shows_a_failing_callback_and_stays_usable(figures):
    edges = [[1, 2], [2, 0], [0, 1], [1, 0]]

    def next_states(s, forced):
        if s == 3 or forced.get("mlp0") == 13:
            boom()
        p = np.zeros(4)
        p[edges[s]] = 0.5
        return p

    panel = FSMPanel(lambda s: {"mlp0": (s, 10 + s)}, next_states, edges, FSM_SITES, n_codes=40, digits=1)
    with pytest.raises(ValueError, match="boom: x"):
        panel.state.value = 3
    assert "ValueError: boom: x" in panel.status.value
    panel.state.value = 2
    assert "state 2" in panel.dist_fig.layout.title.text and panel.status.value == ""
    assert list(panel.dist_fig.data[0].y) == [0.5, 0.5, 0.0, 0.0]
    panel.code.value = 13
    with pytest.raises(ValueError, match="boom: x"):
        panel.force()
    assert "boom: x" in panel.status.value and panel.after is None
    panel.code.value = 14
    panel.force_button.click()
    assert "code 14 forced at mlp0" in panel.dist_fig.layout.title.text and "P(true out-edge of 2)" in panel.status.value


# ----------------------------------------------------------------------------- LiveCurves never stops training


def test_live_curves_note_bad_rows_and_never_raise_into_the_loop(figures):
    curves = LiveCurves(every_s=0.0, max_overhead=0)  # draw on every call
    with pytest.warns(RuntimeWarning) as caught:
        curves(1, {"loss": 1.0, "l0": 32.0})
        curves(2, {"loss": NAN, "l0": 30.0})  # a diverged loss is recorded, drawn as a gap and noted
        curves(3, {"l0": 29.0})  # a missing key is a gap, no note
        curves(4, {"loss": "high", "l0": torch.tensor([1.0, 2.0]), "on": True})  # not numbers: skipped, noted
        curves(5, [("loss", 1.0)])  # not a dict
        curves("five", {"loss": 0.5})  # a step that is not a number: the row number stands in
    assert curves.n_calls == 5 and curves.history["loss"][:4][0] == 1.0
    assert math.isnan(curves.history["loss"][1]) and math.isnan(curves.history["loss"][2])
    assert curves.history["step"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    notes = "\n".join(curves.notes)
    assert "loss is nan at step 2" in notes and "'loss' must be a number" in notes and "'l0' must be a number" in notes
    assert "row must be a dict of metrics" in notes and "step must be a finite number, got 'five'" in notes
    assert len(curves.notes) == 5 and len(caught) == 5  # warned once per kind of problem
    assert "note(s)" in curves.status.value and "step must be a finite number" in curves.status.value

    def broken(fig):
        raise RuntimeError("plotly refused")

    curves.slot.update, good = broken, curves.slot.update
    curves._shape = None  # force a rebuild, which goes through slot.update
    with pytest.warns(RuntimeWarning, match="redraw failed"):
        curves(6, {"loss": 0.4})
    assert curves.n_calls == 6 and "redraw failed (RuntimeError: plotly refused)" in curves.status.value
    curves.slot.update = good
    curves(7, {"loss": 0.3})
    curves.finish()
    loss = [t for t in curves.fig.data if t.name == "loss"][0]
    assert list(loss.x) == [1, 5, 6, 7] and list(loss.y) == [1.0, 0.5, 0.4, 0.3]


# ----------------------------------------------------------------------------- panel settings


def _steer(prompt, feature, strength):
    return {"prompt_tokens": ["a"], "tokens": ["b"], "steered": [False, False], "probs": [1.0, 0.0, 0.0]}


PANEL_CASES = [
    ("steering k 0", lambda: SteeringPanel(_steer, V, 3, k=0), ValueError, r"k must be an int >= 1"),
    ("steering feature past names", lambda: SteeringPanel(_steer, V, 3, feature=5), ValueError, r"feature 5 is not among the 3 named features \(ids 0..2\)"),
    ("steering strength past max", lambda: SteeringPanel(_steer, V, 3, strength=50, max_strength=20), ValueError, r"\|strength\| <= max_strength"),
    ("steering generate", lambda: SteeringPanel("gpt2", V, 3), TypeError, r"generate must be a callable"),
    ("gallery max_rows 0", lambda: FeatureGallery(summary(), max_rows=0), ValueError, r"max_rows must be an int >= 1"),
    ("inversion site unknown", lambda: InversionPanel(lambda *a: None, lambda q: ["<s>"], ["s"], site="t"), ValueError, r"site 't' is not among the sites \['s'\]"),
    ("inversion temperature 0", lambda: InversionPanel(lambda *a: None, lambda q: ["<s>"], ["s"], temperature=0), ValueError, r"temperature must lie in \[0.25, 4\]"),
    ("inversion position past", lambda: InversionPanel(lambda *a: None, lambda q: ["<s>"], ["s"], position=3), ValueError, r"position 3 is outside the query of 1 tokens; allowed 0..0"),
    ("fsm state float", lambda: FSMPanel(lambda s: {"m": (0, 0)}, lambda s, f: [1.0], [[0]], ["m"], n_codes=2, state=0.5), ValueError, r"state must lie in \[0, 1\)"),
    ("fsm digits 0", lambda: FSMPanel(lambda s: {"m": (0, 0)}, lambda s, f: [1.0], [[0]], ["m"], n_codes=2, digits=0), ValueError, r"digits must be an int >= 1"),
    ("live every_s negative", lambda: LiveCurves(every_s=-1), ValueError, r"every_s must be a finite number >= 0"),
    ("live total 0", lambda: LiveCurves(total=0), ValueError, r"total must be None or an int >= 1"),
    ("live smoothing 1", lambda: LiveCurves(smoothing=1.0), ValueError, r"smoothing must lie in \[0, 0.99\]"),
    ("live panels of strings", lambda: LiveCurves({"loss": "fvu"}), ValueError, r"panels must map a subplot title to a list of metric names"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in PANEL_CASES], ids=[c[0] for c in PANEL_CASES])
def test_bad_panel_settings_get_a_clear_error_from_our_own_raise(call, exc, pattern, monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", False)
    with pytest.raises(exc, match=pattern) as excinfo:
        call()
    assert_raised_by_us(excinfo)


def test_hub_names_fail_at_once_when_the_hub_cannot_be_asked(monkeypatch, tmp_path):
    """A dataset or tokenizer name that is not cached, with HF_HUB_OFFLINE set: a ValueError in seconds, not 24-48 s of retries."""
    import time

    from conftest import word_tokenizer
    from nbfeatures.data import token_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for call in (lambda: token_dataset("nobody/no-such-dataset", word_tokenizer()),
                 lambda: token_dataset([str(tmp_path / "x.txt")], "nobody/no-such-tokenizer")):
        start = time.perf_counter()
        with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set, or no network"):
            (tmp_path / "x.txt").write_text("some text\n")
            call()
        assert time.perf_counter() - start < 5
