"""xMGIE: instruction-driven, localized, identity-preserving image editing for ComfyUI.

ComfyUI entry point (V1 contract). ComfyUI imports this folder as a package; pytest may also
import this file on its own (the repository root is a package to it), and then it defines nothing.
"""

WEB_DIRECTORY = "./web"

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
