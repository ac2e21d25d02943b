"""Progressive Feature Blending ([xMGIE] §3.3, eqs 5-6; PFB-Diff): blend the edit branch's U-Net features
with a source branch's under the edit mask, and keep the latent outside the mask on the source trajectory."""

from .blend import BlendPlan, LayerBlend, BlockLayout, blend_features, latent_blend, layer_alpha, parse_layers
from .branch import FeatureBlender, FeatureRecorder, FeaturesComplete, SourceBranch
from .settings import SOURCE_MODES, PFBSettings
from .source import InvertedTrajectory, SourceCache, SourceRecord, fingerprint, invert

__all__ = ["BlendPlan", "LayerBlend", "BlockLayout", "blend_features", "latent_blend", "layer_alpha", "parse_layers",
           "FeatureBlender", "FeatureRecorder", "FeaturesComplete", "SourceBranch", "SOURCE_MODES", "PFBSettings",
           "InvertedTrajectory", "SourceCache", "SourceRecord", "fingerprint", "invert"]
