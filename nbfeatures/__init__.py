"""nbfeatures: Jupyter-first mechanistic interpretability on nnsight.

    import nbfeatures as nbf
    model = nbf.load_model("stories")                      # or nbf.wrap(any_hf_model, tokenizer), a folder, a hub id
    acts = nbf.read_acts(model, "Once upon a time", ["blocks.1.hook_resid_post"])
    out = nbf.generate(model, "The dragon", [nbf.Steer("blocks.1.hook_resid_post", v, coef=4.0)])

What a tutorial needs is one attribute away: the site layer and edits here, the methods as subpackages
(`nbf.sae`, `nbf.codebook`, `nbf.inversion`), the ground-truth corpora (`nbf.data`), metrics, plots and panels.
"""

from . import codebook, data, inversion, metrics, plots, sae, widgets, zoo
from ._versions import __version__
from .codebook import BlockCodes, CodebookModel, ForceCodes, PatchCodes, load_codebook_model
from .edits import Ablate, Edit, Splice, Steer, Transcode, as_dictionary, decoder_rows
from .evals import compare_density, evaluate_sae
from .features import FeatureSummary, summarize_features
from .harvest import TokenSource, harvest
from .prompt_features import PromptFeatures, prompt_features, prompt_features_fn
from .sites import GenerateOutput, Model, RunOutput, generate, read_acts, resolve, run, site_names, tokenizer_of, unwrap
from .steering import steering_fn, token_strings
from .train import TrainConfig, train_sae
from .train_many import train_many
from .widgets import FeatureGallery, FSMPanel, InversionPanel, LiveCurves, SteeringPanel
from .widgets import PromptView
from .zoo import load_model, wrap

__all__ = [
    "__version__",
    "Model", "wrap", "load_model", "unwrap", "tokenizer_of", "site_names", "resolve",
    "read_acts", "run", "generate", "RunOutput", "GenerateOutput",
    "Edit", "Splice", "Transcode", "Steer", "Ablate", "as_dictionary", "decoder_rows",
    "harvest", "TokenSource", "train_sae", "train_many", "TrainConfig", "evaluate_sae", "compare_density",
    "summarize_features", "FeatureSummary", "steering_fn", "token_strings",
    "CodebookModel", "load_codebook_model", "ForceCodes", "BlockCodes", "PatchCodes",
    "FeatureGallery", "FSMPanel", "InversionPanel", "LiveCurves", "SteeringPanel",
    "PromptView", "prompt_features", "prompt_features_fn", "PromptFeatures",
    "codebook", "data", "inversion", "metrics", "plots", "sae", "widgets", "zoo",
]  # fmt: skip
