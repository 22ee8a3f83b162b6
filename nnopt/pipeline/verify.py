"""Validity (checker, shape inference, SSA) and numerical fidelity of a rewritten model in onnxruntime."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from nnopt.analysis.shapes import STRICT, ShapeResult, infer_shapes
from nnopt.errors import DataError, first_line
from nnopt.ir.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes, write_proto_atomically
from nnopt.runtime import (
    DataSource,
    RunTimeLimitExceeded,
    RuntimeUnavailable,
    feeds_for,
    generate_samples,
    load_samples,
    make_session,
    oversized_tensor,
    run_model,
)

#: Lossless passes must keep every output within this error, relative to the output's largest magnitude,
LOSSLESS_TOLERANCE = 1e-5
#: ...or within this absolute error, for outputs whose largest magnitude is tiny.
LOSSLESS_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------- validity
def validity_problems(proto: onnx.ModelProto, *, strict_shapes: bool) -> str | None:
    """None if the model passes the onnx checker (and strict shape inference if asked), else why not."""
    large = tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    try:
        if large:
            with tempfile.TemporaryDirectory(prefix="nnopt-check-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                write_proto_atomically(proto, Path(path), external_data=True)
                onnx.checker.check_model(path)
                error = infer_shapes(path, STRICT).error if strict_shapes else None
        else:
            onnx.checker.check_model(proto)
            error = infer_shapes(proto, STRICT).error if strict_shapes else None
    except Exception as exc:  # boundary: the checker
        text = str(exc).strip().splitlines()
        return f"invalid model: {text[0] if text else type(exc).__name__}"
    return None if error is None else f"invalid model: {error}"


def passes_strict_shape_inference(proto: onnx.ModelProto) -> bool:
    """Whether the model passes strict shape inference at all (many real models do not)."""
    return validity_problems(proto, strict_shapes=True) is None


# ---------------------------------------------------------------------------------------------- fidelity
@dataclass
class Fidelity:
    """How closely a model's outputs follow the reference outputs, over all samples and outputs.

    ``max_rel_error`` is the largest |a - b| relative to the largest |reference| of the same output, so it
    stays meaningful where single elements are near zero. ``top1_agreement`` is given for outputs that
    look like class scores (float, rank 2, more than one class).
    """

    max_abs_error: float
    max_rel_error: float
    cosine_similarity: float
    top1_agreement: float | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "cosine_similarity": self.cosine_similarity,
            "top1_agreement": self.top1_agreement,
            "samples": self.samples,
        }


def compare_outputs(reference: list[list[Any]], candidate: list[list[Any]]) -> Fidelity:
    """Compare per-sample output lists of the same model interface."""
    max_abs = 0.0
    max_rel = 0.0
    cosine = 1.0
    top1_hits = 0
    top1_total = 0
    for ref_outs, cand_outs in zip(reference, candidate):
        for ref, cand in zip(ref_outs, cand_outs):
            ref_a = np.asarray(ref)
            cand_a = np.asarray(cand)
            if ref_a.shape != cand_a.shape:
                return Fidelity(math.inf, math.inf, 0.0, 0.0 if top1_total else None, len(reference))
            if ref_a.dtype.kind not in "fc":
                same = bool(np.array_equal(ref_a, cand_a))
                if not same:
                    max_abs = max(max_abs, math.inf)
                    max_rel = max(max_rel, math.inf)
                    cosine = min(cosine, 0.0)
                continue
            if ref_a.size == 0:
                continue
            r = ref_a.astype(np.float64).ravel()
            c = cand_a.astype(np.float64).ravel()
            nan_mismatch = np.isnan(r) != np.isnan(c)
            if nan_mismatch.any():
                max_abs = max_rel = math.inf
                cosine = min(cosine, 0.0)
                continue
            finite = np.isfinite(r) & np.isfinite(c)
            inf_mismatch = (~finite) & ~np.isnan(r) & (r != c)
            if inf_mismatch.any():
                max_abs = max_rel = math.inf
                continue
            r, c = r[finite], c[finite]
            if r.size == 0:
                continue
            diff = float(np.max(np.abs(r - c)))
            scale = float(np.max(np.abs(r)))
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
            nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
            if nr > 0 and nc > 0:
                cosine = min(cosine, float(np.dot(r, c) / (nr * nc)))
            elif nr != nc:
                cosine = min(cosine, 0.0)
            if ref_a.ndim == 2 and ref_a.shape[1] > 1:
                top1_hits += int(np.sum(np.argmax(ref_a, axis=1) == np.argmax(cand_a, axis=1)))
                top1_total += ref_a.shape[0]
    top1 = top1_hits / top1_total if top1_total else None
    return Fidelity(max_abs, max_rel, cosine, top1, len(reference))


def lossless_excess(
    reference: list[list[Any]], candidate: list[list[Any]], *, rtol: float, atol: float
) -> float:
    """How far outputs are from "unchanged": the worst ratio, over outputs and samples, of max |a - b| to
    the allowance max(rtol × max |reference|, atol). At most 1 means unchanged within tolerance.

    The absolute floor matters for outputs whose largest magnitude is tiny (a saturated sigmoid map
    peaking at 6e-5): there, float32 rounding alone (onnxruntime's own fusions, a different thread
    count) moves outputs by more than ``rtol`` of their scale.
    """
    worst = 0.0
    for ref_outs, cand_outs in zip(reference, candidate):
        for ref, cand in zip(ref_outs, cand_outs):
            r, c = np.asarray(ref), np.asarray(cand)
            if r.shape != c.shape:
                return math.inf
            if r.dtype.kind not in "fc":
                if not np.array_equal(r, c):
                    return math.inf
                continue
            if r.size == 0:
                continue
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            if not np.array_equal(np.isnan(r64), np.isnan(c64)):
                return math.inf
            finite = np.isfinite(r64)
            if not np.array_equal(r64[~finite & ~np.isnan(r64)], c64[~finite & ~np.isnan(c64)]):
                return math.inf
            if not finite.any():
                continue
            diff = float(np.max(np.abs(r64[finite] - c64[finite])))
            allowance = max(rtol * float(np.max(np.abs(r64[finite]))), atol)
            worst = max(worst, diff / allowance)
    return worst


class Verifier:
    """Runs models on fixed reference inputs and compares their outputs.

    The reference inputs come from a data file or are generated (seeded) from the model's input
    signature. If onnxruntime cannot run the original model on them, or a run does not finish within
    ``time_limit`` seconds ("current": the limit ``nnopt.runtime.run_time_limit`` set), or ``shapes``
    (shape inference of ``proto``) shows a tensor too large to build (see ``oversized_tensor``),
    ``unavailable`` says why and numerical verification is skipped (validity checks still run).
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        *,
        data: DataSource | None = None,
        samples: int = 2,
        seed: int = 0,
        input_shapes: dict[str, list[int]] | None = None,
        time_limit: float | None | Literal["current"] = "current",
        shapes: ShapeResult | None = None,
    ) -> None:
        self.unavailable: str | None = None
        #: Lines for the report: how the reference samples were chosen.
        self.notes: list[str] = []
        self.time_limit = time_limit
        #: Whether a run of the original model was stopped at the time limit.
        self.timed_out = False
        self.generated = data is None
        self.samples: list[dict[str, np.ndarray]] = []
        self.reference: list[list[Any]] = []
        try:
            sess = make_session(proto)
        except RuntimeUnavailable as exc:
            if data is not None:
                raise
            self.unavailable = str(exc)
            return
        if data is not None:
            # DataError propagates: the data is the user's input.
            self.samples = load_samples(data, sess, notes=self.notes)
        else:
            try:
                self.samples = generate_samples(sess, count=samples, seed=seed, input_shapes=input_shapes)
            except RuntimeUnavailable as exc:
                self.unavailable = str(exc)
                return
        # Checked after the inputs: a bad data file or an oversized input is the more specific message.
        flood = oversized_tensor(shapes) if shapes is not None else None
        if flood is not None:
            self.unavailable = f"verification impossible: {flood}"
            return
        try:
            self.reference = [run_model(sess, feeds, time_limit=time_limit) for feeds in self.samples]
        except RunTimeLimitExceeded as exc:
            self.timed_out = True
            self.unavailable = (
                f"verification impossible: the original model on the {'generated' if self.generated else 'given'} "
                f"inputs: {exc} (see --run-time-limit)"
            )
            return
        except Exception as exc:  # boundary: onnxruntime
            self.unavailable = (
                "the original model does not run on the "
                f"{'generated' if self.generated else 'given'} inputs: {first_line(exc, 200)}"
            )
            return
        nan = _first_nan_output(self.reference, [o.name for o in sess.get_outputs()])
        if nan is not None:
            # NaN compares as unchanged whatever a pass does: no fidelity can be measured from these outputs.
            if data is not None:
                where = f"data file {data}" if isinstance(data, str | os.PathLike) else "data"
                raise DataError(f"{where}: the original model's output {nan}; outputs cannot be "
                                "compared on this data")
            self.unavailable = f"the original model's output {nan} on the generated inputs: give --data"
            self.reference = []

    def run(self, proto: onnx.ModelProto) -> list[list[Any]]:
        """The model's outputs on every reference sample.

        Raises:
            RunTimeLimitExceeded: one run took longer than the time limit.
        """
        sess = make_session(proto)
        # A pass may change an input's float type (fp16 with keep_io_types=false): its reference values are fed
        # as a caller of the new model would feed them, and their rounding is part of the change measured.
        return [run_model(sess, feeds_for(sess, feeds), time_limit=self.time_limit) for feeds in self.samples]



def _first_nan_output(reference: list[list[Any]], names: list[str]) -> str | None:
    """``'y' is NaN on sample 3`` for the first float output holding a NaN, or None."""
    for i, outputs in enumerate(reference):
        for name, value in zip(names, outputs):
            array = np.asarray(value)
            if array.dtype.kind in "fc" and np.isnan(array).any():
                return f"'{name}' is NaN on sample {i}"
    return None
