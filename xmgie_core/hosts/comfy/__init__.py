"""The ComfyUI host: patch callables and guiders with ComfyUI's signatures (docs/comfyui-internals.md). Only this
package imports comfy.*, and only when ComfyUI is present. unet.py is the seam for the SD U-Net family."""
