"""ComfyUI nodes: one module per technique, each a thin wrapper over xmgie_core."""

from .gb_compositor import XMGIEGBCompositor
from .samples import install_samples

NODE_CLASS_MAPPINGS = {
    "XMGIEGBCompositor": XMGIEGBCompositor,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XMGIEGBCompositor": "XMGIE GB Compositor",
}

install_samples()
