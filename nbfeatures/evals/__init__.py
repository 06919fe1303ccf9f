"""Evaluations of a dictionary: spliced into a model (`splice`), and against planted ground truth (`truth`).

    evaluate_sae, compare_density          reconstruction, sparsity and what splicing costs (runs a model)
    concept_detection, compare_detection   the best latent per labelled concept, against a random baseline
    absorption                             parent latents that go silent on one child (Chanin et al. 2024)
    sparse_probing                         k-latent logistic probes (Gurnee et al. 2023)
    mcc, best_cosine, planted_directions   recovery of planted sparse directions
"""

from .splice import compare_density, evaluate_sae
from .truth import (Absorption, Detection, absorption, best_cosine, compare_detection, concept_detection, mcc,
                    planted_directions, sparse_probing, split_halves)

__all__ = [
    "evaluate_sae", "compare_density",
    "concept_detection", "compare_detection", "Detection", "absorption", "Absorption", "sparse_probing",
    "mcc", "best_cosine", "planted_directions", "split_halves",
]  # fmt: skip
