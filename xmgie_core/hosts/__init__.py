"""Adapters onto host U-Nets: ComfyUI (ModelPatcher patches) and diffusers (attention processors)."""
