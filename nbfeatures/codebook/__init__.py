"""Codebook features (Tamkin et al. 2023): the layer, its code search, a model with codebooks at sites, code search.

    layer.py        CodebookLayer: cosine top-k snapping with a straight-through gradient
    search.py       exact search in cache-sized chunks, the IVF index, the argmax kernel
    model.py        CodebookModel: codebooks spliced at sites; ForceCodes / PatchCodes / BlockCodes; finetuning
    code_search.py  which codes fire where a concept holds, against the best neuron
"""

from .code_search import (NeuronBaseline, best_code_per_label, codes_frame, collect_codes, decode_tokens, neuron_precision_at_recall,
                          rank_codes, regex_targets)
from .layer import CodebookConfig, CodebookLayer, CodebookOutput, codebook_mse, load_codebook_layer, save_codebook_layer
from .model import (BlockCodes, CodebookModel, CodebookObjective, CodebookTrainConfig, ForceCodes, PatchCodes,
                    load_codebook_model)
from .search import IVFConfig, argmax_last, build_ivf, exact_topk, ivf_topk, topk_last

__all__ = ["BlockCodes", "CodebookConfig", "CodebookLayer", "CodebookModel", "CodebookObjective", "CodebookOutput",
           "CodebookTrainConfig", "ForceCodes", "IVFConfig", "NeuronBaseline", "PatchCodes", "argmax_last",
           "best_code_per_label", "build_ivf", "codebook_mse", "codes_frame", "collect_codes", "decode_tokens",
           "exact_topk", "ivf_topk", "load_codebook_layer", "load_codebook_model", "save_codebook_layer", "neuron_precision_at_recall", "rank_codes",
           "regex_targets", "topk_last"]
