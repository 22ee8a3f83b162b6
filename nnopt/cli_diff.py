"""``nnopt diff A.onnx B.onnx``: two models of the same interface side by side.

Op-type counts, params, FLOPs, weight and file bytes, the estimated (and with ``--measure`` measured)
latency, and the fidelity of B's outputs against A's on the user's data or on seeded generated inputs. Every
figure comes from the code ``optimize`` reports with: ``op_type_counts``, the cost model, the verifier's
``compare_outputs`` and ``measure_before_after``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from nnopt.errors import InputError

#: The cost totals compared, with their labels in the table: (totals key, label).
DIFF_KEYS = (("nodes", "nodes"), ("params", "params"), ("flops", "flops"), ("weight_bytes", "weight bytes"))
#: Generated samples the fidelity is measured on without --data (as a budget is judged in optimize).
GENERATED_SAMPLES = 16


@dataclass(frozen=True)
class DiffSettings:
    """What ``nnopt diff`` was asked: data file, profile, given input shapes, seed, and timed runs (0: none)."""

    data: str | None
    hardware: Any
    input_shapes: dict[str, list[int]]
    seed: int
    runs: int
    rules: Any = None


def signature(proto: onnx.ModelProto) -> tuple[list[tuple[str, int, list[int | str]]], int]:
    """The model's interface: each graph input that is not an initializer as (name, element type, dims;
    a dynamic dim is its name or ``?``), and the number of outputs."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in tensor.shape.dim]
        inputs.append((value.name, tensor.elem_type, dims))
    return inputs, len(proto.graph.output)


#: Input element types whose values diff casts from A's to B's (``nnopt.runtime.feeds_for``).
_CASTABLE_FLOATS = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


def check_same_interface(a: onnx.ModelProto, b: onnx.ModelProto, names: tuple[str, str]) -> None:
    """One InputError line when B cannot be fed what A is fed: other input names, types (but for float types
    a value can be cast between: float16, float, double), static dims or a different number of outputs (their
    outputs are compared by position)."""
    (a_in, a_out), (b_in, b_out) = signature(a), signature(b)

    def show(inputs: list[tuple[str, int, list[int | str]]]) -> str:
        return ", ".join(f"{n}[{','.join(map(str, d))}] {onnx.TensorProto.DataType.Name(t).lower()}"
                         for n, t, d in inputs) or "none"

    def fixed(dims: list[int | str]) -> list[int | None]:
        return [d if isinstance(d, int) and d > 0 else None for d in dims]

    def feedable(ta: int, tb: int) -> bool:  # A's values cast to B's float type (fp16 inputs) count as the same
        return ta == tb or {ta, tb} <= _CASTABLE_FLOATS

    same = len(a_in) == len(b_in) and all(
        na == nb and feedable(ta, tb) and len(da) == len(db)
        and all(x == y or x is None or y is None for x, y in zip(fixed(da), fixed(db)))
        for (na, ta, da), (nb, tb, db) in zip(a_in, b_in)
    )
    if not same:
        raise InputError(f"nnopt diff: {names[0]} and {names[1]} take different inputs: {show(a_in)} against "
                         f"{show(b_in)}; diff compares two versions of one model")
    if a_out != b_out:
        raise InputError(f"nnopt diff: {names[0]} has {a_out} output(s) and {names[1]} {b_out}; diff compares "
                         "two versions of one model")


def diff(a_path: Path, b_path: Path, settings: DiffSettings) -> dict[str, Any]:
    """The comparison as plain data (what ``--json`` prints)."""
    from nnopt.cost import analyze
    from nnopt.cost.inputs import sample_input_shapes
    from nnopt.ir.model import bytes_on_disk, load_model
    from nnopt.pipeline.table import op_type_counts
    from nnopt.runtime import DEFAULT_RUN_TIME_LIMIT_S, run_time_limit

    models = [load_model(a_path), load_model(b_path)]
    protos = [m.to_proto() for m in models]
    check_same_interface(protos[0], protos[1], (str(a_path), str(b_path)))
    with run_time_limit(DEFAULT_RUN_TIME_LIMIT_S):
        fidelity, verification, first = _fidelity(protos, settings)
        # Dynamic dims are costed at the first sample's shapes (--input-shape wins), as analyze does.
        shapes = settings.input_shapes if first is None else sample_input_shapes(protos[0].graph, first,
                                                                                 settings.input_shapes)
        totals = [analyze(m, hardware=settings.hardware, input_shapes=shapes, rules=settings.rules).totals
                  for m in models]
        measured = None
        if settings.runs:
            from nnopt.cli_measure import measure_before_after

            measured = measure_before_after(a_path, models[1], settings.runs, first, settings.input_shapes)
    keys = [key for key, _ in DIFF_KEYS] + ["latency_s"]
    return {
        "a": {"path": str(a_path), "bytes": bytes_on_disk(a_path)},
        "b": {"path": str(b_path), "bytes": bytes_on_disk(b_path)},
        "profile": {"name": settings.hardware.name, "calibrated": settings.hardware.runtime == "onnxruntime"},
        "totals": {"a": {k: totals[0].get(k) for k in keys}, "b": {k: totals[1].get(k) for k in keys}},
        "op_types": {"a": op_type_counts(models[0].all_graphs()), "b": op_type_counts(models[1].all_graphs())},
        "fidelity": fidelity,
        "verification": verification,
        **({"measured": measured} if measured is not None else {}),
    }


def _fidelity(protos: list[onnx.ModelProto], settings: DiffSettings
              ) -> tuple[dict[str, Any] | None, str, dict[str, Any] | None]:
    """B's outputs against A's: (the figures or None, ``onnxruntime`` or why not, the first sample's feeds)."""
    from nnopt.errors import first_line
    from nnopt.pipeline.verify import Verifier, compare_outputs
    from nnopt.report import GENERATED, USER_DATA

    verifier = Verifier(protos[0], data=settings.data, samples=GENERATED_SAMPLES, seed=settings.seed,
                        input_shapes=settings.input_shapes)
    first = verifier.samples[0] if settings.data and verifier.samples else None
    if verifier.unavailable is not None:
        return None, verifier.unavailable, first
    try:
        outputs = verifier.run(protos[1])
    except Exception as exc:  # boundary: onnxruntime on the second model
        return None, f"onnxruntime cannot run B on these inputs: {first_line(exc, 300)}", first
    figures = compare_outputs(verifier.reference, outputs).to_dict()
    return figures | {"source": GENERATED if verifier.generated else USER_DATA}, "onnxruntime", first


def format_diff(result: dict[str, Any]) -> str:
    """The comparison as a person reads it: the totals table, latency, fidelity, then the op types."""
    from nnopt.cli_measure import measured_line
    from nnopt.cost.report import time_unit
    from nnopt.pipeline.table import change_parts, op_type_table

    a, b = result["totals"]["a"], result["totals"]["b"]
    pairs = [(label, a.get(key), b.get(key)) for key, label in DIFF_KEYS]
    pairs.append(("file bytes", result["a"]["bytes"], result["b"]["bytes"]))
    lines = [f"A: {result['a']['path']}", f"B: {result['b']['path']}", *change_parts(pairs)]
    est_a, est_b = a.get("latency_s"), b.get("latency_s")
    if isinstance(est_a, int | float) and isinstance(est_b, int | float):
        scale, unit = time_unit(max(est_a, est_b))
        change = f" ({(est_b - est_a) / est_a * 100:+.1f} %)" if est_a else ""
        lines.append(f"estimated latency ({result['profile']['name']}): {est_a / scale:,.3f} -> "
                     f"{est_b / scale:,.3f} {unit}{change}")
    if "measured" in result:
        lines.append(measured_line(result["measured"]))
    fid = result["fidelity"]
    if fid is None:
        lines.append(f"fidelity: not measured: {result['verification']}")
    else:
        top1 = f", top-1 agreement {fid['top1_agreement']:.4f}" if fid["top1_agreement"] is not None else ""
        lines.append(f"fidelity of B against A on {fid['samples']} samples of {fid['source']}: max abs error "
                     f"{fid['max_abs_error']:.3g}, max rel error {fid['max_rel_error']:.3g}, cosine "
                     f"{fid['cosine_similarity']:.6f}{top1}")
    lines += ["", op_type_table(result["op_types"]["a"], result["op_types"]["b"], labels=("A", "B"))]
    return "\n".join(lines)
