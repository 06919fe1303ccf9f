"""The dictionary family: one contract (`Dictionary`, in base.py), one file per dictionary, one file format module.

    topk.py    TopKSAE (Gao et al. 2024)          relu.py    ReLUSAE, the L1 "local" baseline
    binary.py  BinaryAE (1-bit codes)             e2e.py     objectives through the spliced model (Braun et al. 2024)
    io.py      SAELens v6 folders (+ sparsify, dictionary_learning readers), register_architecture

Adding a dictionary: one new file with its config, module (`architecture`, `default_objective()`) and objective,
then `register_architecture(name, Module, Config)` at the bottom of that file and its import in this one.
"""

from .base import Dictionary
from .binary import BinaryAE, BinaryConfig, BinaryObjective, deviation_acts, feature_set_entropy
from .e2e import E2EObjective, downstream_sites, finetune_kl_mse, nearest_neighbour_cosine, warm_start_
from .io import load_sae, register_architecture, save_sae
from .relu import ReLUConfig, ReLUObjective, ReLUSAE
from .topk import TopKConfig, TopKObjective, TopKSAE

__all__ = ["BinaryAE", "BinaryConfig", "BinaryObjective", "Dictionary", "E2EObjective", "ReLUConfig", "ReLUObjective", "ReLUSAE",
           "TopKConfig", "TopKObjective", "TopKSAE", "deviation_acts", "downstream_sites", "feature_set_entropy", "finetune_kl_mse", "load_sae",
           "nearest_neighbour_cosine", "register_architecture", "save_sae", "warm_start_"]
