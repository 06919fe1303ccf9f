"""The dictionary family: one contract (`Dictionary`, in base.py), one file per dictionary, the file formats.

    topk.py    TopKSAE (Gao et al. 2024)          relu.py    ReLUSAE, the L1 "local" baseline
    batchtopk.py  BatchTopKSAE (Bussmann et al. 2024): top k*N over the batch; a JumpReLU at inference
    jumprelu.py   JumpReLUSAE (Rajamanoharan et al. 2024): learned thresholds, straight-through L0 (step, tanh, quadratic)
    matryoshka.py MatryoshkaSAE (Bussmann et al. 2025): BatchTopK trained on nested prefixes
    binary.py  BinaryAE (1-bit codes)             e2e.py     objectives through the spliced model (Braun et al. 2024)

    saelens_format.py  SAELensSAE: every SAELens 6 inference architecture, computed as SAELens computes it;
                       from_saelens / to_saelens between a SAELens cfg.json + tensors and our modules
    sparsify_format.py GroupMaxSAE, TopKTranscoder: sparsify's variants SAELens lacks (nbfeatures.groupmax,
                       nbfeatures.topk_transcoder), inference only
    producers.py       read_foreign: sparsify, dictionary_learning, Gemma Scope and Llama Scope files -> SAELens (cfg, tensors)
    pretrained.py      locate_pretrained: a SAELens registry release + sae_id -> its files in the Hugging Face cache
    io.py              load_sae(folder) or load_sae(release, sae_id); save_sae writes a SAELens v6 folder;
                       register_architecture

Adding a dictionary: one new file with its config, module (`architecture`, `default_objective()`) and objective,
then `register_architecture(name, Module, Config)` at the bottom of that file and its import in this one.
"""

from .base import Dictionary
from .batchtopk import BatchTopKConfig, BatchTopKObjective, BatchTopKSAE
from .binary import BinaryAE, BinaryConfig, BinaryObjective, deviation_acts, feature_set_entropy
from .e2e import E2EObjective, downstream_sites, finetune_kl_mse, nearest_neighbour_cosine, warm_start_
from .io import load_sae, register_architecture, save_sae
from .jumprelu import JumpReLUConfig, JumpReLUObjective, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaObjective, MatryoshkaSAE
from .pretrained import locate as locate_pretrained
from .producers import read_foreign
from .relu import ReLUConfig, ReLUObjective, ReLUSAE
from .saelens_format import SAELensConfig, SAELensSAE, from_saelens, to_saelens
from .sparsify_format import GroupMaxSAE, SparsifyConfig, TopKTranscoder
from .topk import TopKConfig, TopKObjective, TopKSAE

__all__ = ["BatchTopKConfig", "BatchTopKObjective", "BatchTopKSAE", "BinaryAE", "BinaryConfig", "BinaryObjective", "Dictionary",
           "E2EObjective", "GroupMaxSAE", "JumpReLUConfig", "JumpReLUObjective", "JumpReLUSAE", "MatryoshkaConfig",
           "MatryoshkaObjective", "MatryoshkaSAE", "ReLUConfig", "ReLUObjective", "ReLUSAE", "SAELensConfig", "SAELensSAE",
           "SparsifyConfig", "TopKConfig", "TopKObjective", "TopKSAE", "TopKTranscoder", "deviation_acts", "downstream_sites",
           "feature_set_entropy", "finetune_kl_mse", "from_saelens", "load_sae", "locate_pretrained", "nearest_neighbour_cosine",
           "read_foreign", "register_architecture", "save_sae", "to_saelens", "warm_start_"]  # fmt: skip
