"""Edit metrics, each written after the reference implementation it is named after (the docstring of each function
gives its formula and source): pixels.py (MagicBrush L1 / L2, PSNR, SSIM, region IoU), semantic.py (MagicBrush CLIP-I,
CLIP-T, DINO; Emu Edit CLIPdir, CLIPimg, CLIPout), models.py (the CLIP and DINO encoders, from local folders only),
identity.py (IPS per face), leak.py (xMGIE's own: the change outside the edit region, and its drift map) and
registry.py (the table the evaluation runs, where more metrics are registered)."""
