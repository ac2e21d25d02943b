"""The diffusers host: attention processors, module hooks and sampling loops on diffusers models, and loading them
from local files. unet.py is the seam for the UNet2DConditionModel family."""
