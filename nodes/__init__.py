"""ComfyUI nodes: one module per technique, each a thin wrapper over xmgie_core."""

from .crop_stitch import XMGIECropForEdit, XMGIEStitchEdit
from .cross_attention_mask import XMGIECrossAttentionMask
from .drift_map import XMGIEDriftMap
from .edit_metrics import XMGIEEditMetrics
from .gb_compositor import XMGIEGBCompositor
from .identity import XMGIEIdentityScore, XMGIEIDEmbedder
from .inputs import with_checked_numbers
from .instruction import XMGIEInstruction
from .mgie import XMGIEMGIEGuidance
from .model_folders import register_model_folders
from .pfb import XMGIEPFBGuider, XMGIEPFBSampler
from .region_predictor import XMGIERegionPredictor
from .samples import install_samples

NODE_CLASS_MAPPINGS = {
    "XMGIEInstruction": XMGIEInstruction,
    "XMGIERegionPredictor": XMGIERegionPredictor,
    "XMGIEMGIEGuidance": XMGIEMGIEGuidance,
    "XMGIEGBCompositor": XMGIEGBCompositor,
    "XMGIECropForEdit": XMGIECropForEdit,
    "XMGIEStitchEdit": XMGIEStitchEdit,
    "XMGIECrossAttentionMask": XMGIECrossAttentionMask,
    "XMGIEPFBSampler": XMGIEPFBSampler,
    "XMGIEPFBGuider": XMGIEPFBGuider,
    "XMGIEIDEmbedder": XMGIEIDEmbedder,
    "XMGIEIdentityScore": XMGIEIdentityScore,
    "XMGIEDriftMap": XMGIEDriftMap,
    "XMGIEEditMetrics": XMGIEEditMetrics,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XMGIEInstruction": "XMGIE Instruction",
    "XMGIERegionPredictor": "XMGIE Region Predictor",
    "XMGIEMGIEGuidance": "XMGIE MGIE Guidance",
    "XMGIEGBCompositor": "XMGIE GB Compositor",
    "XMGIECropForEdit": "XMGIE Crop For Edit",
    "XMGIEStitchEdit": "XMGIE Stitch Edit",
    "XMGIECrossAttentionMask": "XMGIE Cross-Attention Mask",
    "XMGIEPFBSampler": "XMGIE PFB Sampler",
    "XMGIEPFBGuider": "XMGIE PFB Guider",
    "XMGIEIDEmbedder": "XMGIE ID Embedder",
    "XMGIEIdentityScore": "XMGIE Identity Score",
    "XMGIEDriftMap": "XMGIE Drift Map",
    "XMGIEEditMetrics": "XMGIE Edit Metrics",
}

NODE_CLASS_MAPPINGS = {key: with_checked_numbers(cls, NODE_DISPLAY_NAME_MAPPINGS[key])
                       for key, cls in NODE_CLASS_MAPPINGS.items()}

install_samples()
register_model_folders()
