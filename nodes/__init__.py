"""ComfyUI nodes: one module per technique, each a thin wrapper over xmgie_core."""

from .cross_attention_mask import XMGIECrossAttentionMask
from .gb_compositor import XMGIEGBCompositor
from .instruction import XMGIEInstruction, register_llm_folder
from .pfb import XMGIEPFBGuider, XMGIEPFBSampler
from .samples import install_samples

NODE_CLASS_MAPPINGS = {
    "XMGIEInstruction": XMGIEInstruction,
    "XMGIEGBCompositor": XMGIEGBCompositor,
    "XMGIECrossAttentionMask": XMGIECrossAttentionMask,
    "XMGIEPFBSampler": XMGIEPFBSampler,
    "XMGIEPFBGuider": XMGIEPFBGuider,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XMGIEInstruction": "XMGIE Instruction",
    "XMGIEGBCompositor": "XMGIE GB Compositor",
    "XMGIECrossAttentionMask": "XMGIE Cross-Attention Mask",
    "XMGIEPFBSampler": "XMGIE PFB Sampler",
    "XMGIEPFBGuider": "XMGIE PFB Guider",
}

install_samples()
register_llm_folder()
