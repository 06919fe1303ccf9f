"""InversionView (Huang et al. 2024): sample the inputs an activation encodes with a conditional decoder.

    preimage_eps(z) = {x : D(f(x), z) <= eps}      D(a, z) = min_t ||a_t - z|| / ||z||   (or min_t 1 - cos(a_t, z))
    decoder p(x | z, site): a small causal transformer; [z / scale_site, site embedding] -> residual MLP blocks
    -> one extra attended key/value slot in every layer ("prefix", the reference's default) or cross-attention

Training pairs are made on the fly: sample inputs, run the probed model once, pick a site and a query position
per row, keep (activation, whole input, site). Sampling draws candidates at several temperatures (optionally
with noise on z), re-runs every candidate through the probed model for its true distance and colours each
token by log p(token | z) - log p(token | z_BOS). A site is a `sites` name; `blocks.{i}.attn.hook_z.{h}`
means head h's output (its slice of the input of the attention's output projection).

Modules: `probe` (distance, reading sites, training pairs), `decoder`, `train`, `sample`.
"""

from .decoder import DecoderConfig, InversionDecoder, load_decoder, save_decoder, sequence_loss
from .sample import (InversionSamples, feature_query, generate, panel_callables, query_activation, sample, strongest_latent,
                     token_logprobs)
from .probe import (METRICS, FeatureSite, PairSource, default_sites, distance, read_sites, real_positions, site_acts, site_name,
                    site_widths, split_site)
from .train import DECODER_TRAIN, DecoderObjective, RebalanceConfig, decoder_train_config, inside_fractions, train_decoder

__all__ = [
    "DECODER_TRAIN", "METRICS", "DecoderConfig", "DecoderObjective", "FeatureSite", "RebalanceConfig", "decoder_train_config", "InversionDecoder", "InversionSamples", "PairSource", "default_sites",
    "distance", "feature_query", "generate", "inside_fractions", "load_decoder", "panel_callables", "query_activation",
    "read_sites", "real_positions", "sample", "save_decoder", "sequence_loss", "site_acts", "site_name", "site_widths", "split_site",
    "strongest_latent", "token_logprobs",
    "train_decoder",
]  # fmt: skip
