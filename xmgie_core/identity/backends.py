"""Face recognizers behind the ID Embedder: insightface (ArcFace packs such as antelopev2 / buffalo_l from ComfyUI's
models/insightface, as IPAdapter FaceID / InstantID / PuLID users have them) and dlib (its face detector, 5-point
shape predictor and ResNet embedder, whose weights ship in the face-recognition-models package).

Nothing is downloaded: insightface gets the model folder's full path, after the checks below say exactly what
is wrong with a folder users commonly get wrong (unextracted zip, one folder level too deep or too shallow, a
missing detection or recognition model).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import XMGIEInputError
from .faces import Face, iou, normalise, view

INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")
"""insightface's own packs: their weights are licensed for non-commercial research only."""
NON_COMMERCIAL = "(non-commercial licence)"
DETECTION_SIZES = (640, 512, 384, 256)
"""insightface detection input sizes, largest first: a face missed at one size is looked for at the next."""


def onnx_role(path: Path) -> str:
    """What insightface's model router would make of an ONNX file: 'detection' (5 or more outputs),
    'recognition' (a square input of 112 or more, a multiple of 16), or 'other'."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if len(graph.output) >= 5:
        return "detection"
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[2] == dims[3] and dims[2] >= 112 and dims[2] % 16 == 0:
        return "recognition"
    return "other"


def insightface_folder(root: Path, name: str) -> Path:
    """<root>/models/<name>, checked: it must hold a detection and a recognition ONNX model."""
    folder = root / "models" / name
    fix = f"the .onnx files belong directly in {folder}"
    if not folder.is_dir():
        for zipped in (root / "models" / f"{name}.zip", root / f"{name}.zip"):
            if zipped.is_file():
                raise XMGIEInputError(f"The insightface pack {name!r} is still a zip: {zipped}. Extract it; {fix}.")
        if (root / name).is_dir() and list((root / name).glob("*.onnx")):
            raise XMGIEInputError(f"The insightface pack {name!r} is in {root / name}, one level too high: move that "
                                  f"folder into {root / 'models'}; {fix}.")
        raise XMGIEInputError(f"The insightface pack {name!r} was not found: no folder {folder}. Download it (as "
                              f"IPAdapter FaceID / InstantID users do) and extract it ({fix}), or choose the dlib "
                              "backend.")
    onnx_files = sorted(folder.glob("*.onnx"))
    nested = folder / name
    if not onnx_files and nested.is_dir() and list(nested.glob("*.onnx")):
        raise XMGIEInputError(f"The insightface pack {name!r} is nested one level too deep ({nested}): move its "
                              f".onnx files up into {folder}.")
    if not onnx_files:
        raise XMGIEInputError(f"{folder} holds no .onnx model files ({fix}); found: "
                              f"{', '.join(p.name for p in folder.iterdir()) or 'nothing'}.")
    roles = {p.name: onnx_role(p) for p in onnx_files}
    for role in ("detection", "recognition"):
        if role not in roles.values():
            raise XMGIEInputError(f"{folder} has no face {role} model among {', '.join(roles)}; the pack is "
                                  "incomplete: download it again.")
    return folder


def insightface_choices(root: Path | None) -> list[str]:
    """Backend names for the insightface packs: insightface's own (always listed, labelled NON_COMMERCIAL) and any
    other folder <root>/models/<name>/ holding .onnx files in the same layout (e.g. an Apache-licensed AuraFace
    pack with an ArcFace-style recognition model), whose licence is its own."""
    own = [f"insightface: {p} {NON_COMMERCIAL}" for p in INSIGHTFACE_PACKS]
    models = root / "models" if root is not None else None
    other = sorted(p.name for p in models.iterdir() if p.is_dir() and p.name not in INSIGHTFACE_PACKS
                   and any(p.glob("*.onnx"))) if models is not None and models.is_dir() else []
    return own + [f"insightface: {name}" for name in other]


def insightface_pack(choice: str) -> str:
    """The pack folder name of a backend choice: 'insightface: antelopev2 (non-commercial licence)' -> 'antelopev2'."""
    return choice.split(":", 1)[1].replace(NON_COMMERCIAL, "").strip()


class InsightFace:
    """insightface FaceAnalysis (detection + recognition only) on a checked model folder."""

    CANDIDATE_THRESHOLD = 0.3
    """SCRFD score of a candidate (its own default, 0.5, must hold when the candidate is confirmed)."""
    CONFIRM_SIDE = 160
    """A face is confirmed in a view where it is this many px (the view: twice that, the detector's input size)."""

    def __init__(self, root: Path, name: str, use_cuda: bool = False):
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError:
            raise XMGIEInputError("The insightface backend needs the insightface and onnxruntime packages: pip "
                                  "install insightface onnxruntime (or choose the dlib backend).") from None

        folder = insightface_folder(root, name)
        cuda = use_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.name = f"insightface:{name}"
        self.app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"], providers=providers)
        self.ctx = 0 if cuda else -1

    def _detect(self, rgb: np.ndarray, size: int, threshold: float):
        self.app.prepare(ctx_id=self.ctx, det_thresh=threshold, det_size=(size, size))
        return self.app.get(np.ascontiguousarray(rgb[..., ::-1]))

    def candidates(self, rgb: np.ndarray) -> list[tuple[tuple, float]]:
        for size in DETECTION_SIZES:
            found = self._detect(rgb, size, self.CANDIDATE_THRESHOLD)
            if found:
                return [(tuple(float(v) for v in f.bbox), float(f.det_score)) for f in found]
        return []

    def confirm(self, rgb: np.ndarray, box: tuple, strict: bool = True) -> Face | None:
        crop, x0, y0, scale = view(rgb, box, 2.0, self.CONFIRM_SIDE)
        found = self._detect(crop, 2 * self.CONFIRM_SIDE, 0.5 if strict else self.CANDIDATE_THRESHOLD)
        faces = [Face(tuple(float(v) for v in f.bbox), np.asarray(f.kps, dtype=np.float32), float(f.det_score),
                      normalise(f.embedding)).mapped(x0, y0, scale) for f in found]
        i = closest([f.box for f in faces], box, strict)
        return None if i is None else faces[i]


def closest(boxes: list[tuple], box: tuple, strict: bool) -> int | None:
    """The index of the box nearest `box`'s centre; strict: only a box overlapping `box` (IoU >= 0.3)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    near = [i for i, b in enumerate(boxes) if not strict or iou(b, box) >= 0.3]
    return min(near, key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2 - cx) ** 2 + ((boxes[i][1] + boxes[i][3]) / 2 - cy) ** 2,
               default=None)


def dlib_models() -> Path:
    """The folder of dlib's weights shipped in face-recognition-models (public domain; located without importing
    that package, whose __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise XMGIEInputError("The dlib backend needs the dlib-bin and face-recognition-models packages: "
                              "pip install dlib-bin face-recognition-models")
    return Path(spec.submodule_search_locations[0]) / "models"


class Dlib:
    """dlib: HOG detector candidates (its score above CANDIDATE_SCORE), each confirmed by dlib's CNN face detector
    (MMOD) in a view where the face is CONFIRM_SIDE px; 68 landmarks (face masks), the 5-point shape for dlib's
    128-d ResNet embedding (as dlib's own face recognition example does)."""

    CANDIDATE_SCORE = -0.5
    """HOG's own default cut is 0; below it faces turned, dark or small still score, and so does clutter."""
    CONFIRM_SIDE = 100
    """The CNN finds faces of 80 px and more at its native scale."""

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise XMGIEInputError("The dlib backend needs the dlib-bin and face-recognition-models packages: "
                                  "pip install dlib-bin face-recognition-models") from None
        models = dlib_models()
        self.name = "dlib"
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
        self.shape5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.shape68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self.embedder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def candidates(self, rgb: np.ndarray) -> list[tuple[tuple, float]]:
        rects, scores, _ = self.detector.run(np.ascontiguousarray(rgb), 1, self.CANDIDATE_SCORE)
        return [((float(r.left()), float(r.top()), float(r.right()), float(r.bottom())), float(s))
                for r, s in zip(rects, scores)]

    def confirm(self, rgb: np.ndarray, box: tuple, strict: bool = True) -> Face | None:
        crop, x0, y0, scale = view(rgb, box, 2.0, self.CONFIRM_SIDE)
        found = [((r.rect.left() / scale + x0, r.rect.top() / scale + y0, r.rect.right() / scale + x0,
                   r.rect.bottom() / scale + y0), float(r.confidence)) for r in self.cnn(np.ascontiguousarray(crop), 0)]
        i = closest([b for b, _ in found], box, strict)
        return None if i is None else self.embed(rgb, *found[i])

    def embed(self, rgb: np.ndarray, box: tuple, score: float) -> Face:
        """The face in `box` of the full image: 68 landmarks and the embedding from the 5-point shape."""
        rgb = np.ascontiguousarray(rgb)
        rect = self.dlib.rectangle(*(int(round(v)) for v in box))
        points = np.array([(p.x, p.y) for p in self.shape68(rgb, rect).parts()], dtype=np.float32)
        embedding = normalise(np.array(self.embedder.compute_face_descriptor(rgb, self.shape5(rgb, rect))))
        return Face(tuple(float(v) for v in box), points, score, embedding)
