"""The search's data: calibration samples the passes fit on, and evaluation samples it scores candidates on.

The drop is measured on ``--eval``, never on what the passes calibrate or fit on. Without ``--eval`` a
seeded split of ``--data`` holds a quarter of its samples out (the report says so).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from nnopt.errors import DataError, InputError, first_line
from nnopt.runtime import MAX_DATA_SAMPLES, load_samples, make_session

#: Share of ``--data`` held out for evaluation when no ``--eval`` file is given.
HELD_OUT_SHARE = 0.25
#: Fewer evaluation samples than this make a drop of a few points meaningless.
MIN_EVAL_SAMPLES = 8
#: Fewer calibration samples than this cannot calibrate int8 ranges or fit anything.
MIN_CALIBRATION_SAMPLES = 4


@dataclass
class SearchData:
    """Calibration data as the ``.npz`` bytes passes read, and the evaluation samples with their arrays.

    Attributes:
        calibration: an ``.npz`` (bytes) of the calibration samples, with their labels when known.
        eval_samples: one feed dict per evaluation sample.
        eval_arrays: the evaluation inputs stacked over samples, plus the labels (``labels_key``) when present:
            the ``data`` a metric sees.
        description: how the two sets were chosen, for the report.
    """

    calibration: bytes
    eval_samples: list[dict[str, np.ndarray]]
    eval_arrays: dict[str, np.ndarray]
    description: str
    calibration_count: int = 0
    notes: list[str] = field(default_factory=list)


def load_search_data(model: onnx.ModelProto, data: str | Path, eval_data: str | Path | None, *, seed: int,
                     labels_key: str, needs_labels: bool) -> SearchData:
    """Read ``--data`` (and ``--eval``), check them against the model, split when there is no ``--eval``.

    Raises:
        DataError: a file that does not fit the model, too few samples, or labels missing or malformed.
    """
    session = make_session(model)
    calib = load_samples(data, session, ignore=(labels_key,))
    calib_labels = _labels(data, labels_key, len(calib), required=False)
    if eval_data is not None:
        evals = load_samples(eval_data, session, ignore=(labels_key,))
        eval_labels = _labels(eval_data, labels_key, len(evals), required=needs_labels)
        description = f"evaluation: {Path(eval_data).name} ({len(evals)} samples, held out by the user)"
    else:
        if needs_labels:
            _labels(data, labels_key, len(calib), required=True)
        order = np.random.default_rng(seed).permutation(len(calib))
        held = max(MIN_EVAL_SAMPLES, int(round(HELD_OUT_SHARE * len(calib))))
        eval_index, calib_index = sorted(order[:held]), sorted(order[held:])
        evals = [calib[i] for i in eval_index]
        eval_labels = None if calib_labels is None else calib_labels[eval_index]
        calib = [calib[i] for i in calib_index]
        calib_labels = None if calib_labels is None else calib_labels[calib_index]
        description = (f"evaluation: a seeded split of {Path(data).name} (seed {seed}): {len(evals)} samples held "
                       f"out, {len(calib)} left to calibrate and fit on (no --eval given)")
    if len(evals) < MIN_EVAL_SAMPLES:
        raise DataError(f"the evaluation data holds {len(evals)} samples; the drop needs at least {MIN_EVAL_SAMPLES}")
    if len(calib) < MIN_CALIBRATION_SAMPLES:
        raise DataError(f"the calibration data holds {len(calib)} samples; passes need at least "
                        f"{MIN_CALIBRATION_SAMPLES}")
    arrays = stack(evals)
    if eval_labels is not None:
        arrays[labels_key] = eval_labels
    return SearchData(_npz(calib, calib_labels), evals, arrays, description, len(calib))


def stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Samples' arrays joined on axis 0 (samples of batch 1) or stacked (samples without a batch axis)."""
    out: dict[str, np.ndarray] = {}
    for name in samples[0]:
        parts = [np.asarray(s[name]) for s in samples]
        batched = all(p.ndim >= 1 and p.shape[0] == 1 for p in parts)
        out[name] = np.concatenate(parts) if batched else np.stack(parts)
    return out


def _npz(samples: list[dict[str, np.ndarray]], labels: np.ndarray | None) -> bytes:
    """An ``.npz`` of samples as ``load_samples`` reads it back: each input's samples stacked on a new axis."""
    arrays = {name: np.stack([np.asarray(s[name]) for s in samples]) for name in samples[0]}
    if labels is not None:
        arrays["labels"] = labels
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub takes the first keyword for allow_pickle
    return buffer.getvalue()


def _labels(path: str | Path, key: str, count: int, *, required: bool) -> np.ndarray | None:
    """The data file's ``key`` array as one int64 class per sample; None when absent and not required."""
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{key}.npy" not in archive.namelist():
                if required:
                    raise DataError(f"data file {path}: no array '{key}' (the class labels --metric top1 needs; "
                                    "--labels KEY names another array)")
                return None
            with archive.open(f"{key}.npy") as stream:
                labels = np.lib.format.read_array(stream, allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:  # boundary: zip and .npy readers
        raise DataError(f"data file {path}: not a readable .npz archive ({first_line(exc, 300)})") from None
    cut = count == MAX_DATA_SAMPLES and labels.ndim == 1 and labels.shape[0] > count  # load_samples read no more
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.shape[0] != count and not cut):
        raise DataError(f"data file {path}: array '{key}' must hold one integer class per sample ({count}), "
                        f"got {labels.dtype} of shape {list(labels.shape)}")
    return labels[:count].astype(np.int64)


def check_labels_key(key: str) -> str:
    """``--labels KEY``: a non-empty array name."""
    if not key or not key.strip():
        raise InputError("--labels: expected the name of the labels array, got an empty string")
    return key
