"""nbfeatures: Jupyter-first mechanistic interpretability on nnsight.

    import nbfeatures as nbf
    model = nbf.load_model("stories")                      # or nbf.wrap(any_hf_model, tokenizer)
    acts = nbf.read_acts(model, "Once upon a time", ["blocks.1.hook_resid_post"])
    out = nbf.generate(model, "The dragon", [nbf.Steer("blocks.1.hook_resid_post", v, coef=4.0)])
"""

from . import zoo
from ._versions import __version__
from .codebook_model import BlockCodes, CodebookModel, ForceCodes, PatchCodes, load_codebook_model
from .edits import Ablate, Splice, Steer
from .features import FeatureSummary, summarize_features
from .sites import GenerateOutput, Model, RunOutput, generate, load_model, read_acts, resolve, run, site_names, unwrap, wrap

__all__ = [
    "__version__",
    "Model", "wrap", "load_model", "unwrap", "site_names", "resolve",
    "read_acts", "run", "generate", "RunOutput", "GenerateOutput",
    "Splice", "Steer", "Ablate",
    "summarize_features", "FeatureSummary",
    "CodebookModel", "load_codebook_model", "ForceCodes", "BlockCodes", "PatchCodes",
    "zoo",
]
