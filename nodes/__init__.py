"""ComfyUI nodes: one module per technique, each a thin wrapper over xmgie_core."""

from .cross_attention_mask import XMGIECrossAttentionMask
from .gb_compositor import XMGIEGBCompositor
from .pfb import XMGIEPFBGuider, XMGIEPFBSampler
from .samples import install_samples

NODE_CLASS_MAPPINGS = {
    "XMGIEGBCompositor": XMGIEGBCompositor,
    "XMGIECrossAttentionMask": XMGIECrossAttentionMask,
    "XMGIEPFBSampler": XMGIEPFBSampler,
    "XMGIEPFBGuider": XMGIEPFBGuider,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XMGIEGBCompositor": "XMGIE GB Compositor",
    "XMGIECrossAttentionMask": "XMGIE Cross-Attention Mask",
    "XMGIEPFBSampler": "XMGIE PFB Sampler",
    "XMGIEPFBGuider": "XMGIE PFB Guider",
}

install_samples()
