"""Sparse autoencoders: SAELens-format files (``core``), steering and clamping with features (``edits``), training
(``train``) and reading features (``read``). docs/sae.md."""

from .core import ARCHITECTURES, SAE, hook_of_site, load_sae, site_of_hook
from .edits import ClampableSAE, ClampFeature, Splice, clamp_interventions, feature_vector

__all__ = ["ARCHITECTURES", "SAE", "ClampableSAE", "ClampFeature", "Splice", "clamp_interventions", "feature_vector", "hook_of_site",
           "load_sae", "site_of_hook"]
