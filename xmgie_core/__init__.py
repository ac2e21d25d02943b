"""xMGIE core library: host-agnostic kernels for instruction-driven, localized image editing.

Imports no ComfyUI module (only xmgie_core.hosts.comfy* may, and only when ComfyUI is present).
"""

__version__ = "0.1.0"
