"""prune through Transpose / Reshape / Squeeze: NHWC models (as tf2onnx emits them) prune like their NCHW twins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nnopt.cost import analyze
from nnopt.passes.prune import Prune, PruneOptions
from nnopt.testing import apply_pass, model_from_text, random_feeds, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _prune(**options: object) -> Prune:
    return Prune(PruneOptions.create("prune", **options))


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 7 * sum(shape)).standard_normal(shape).astype(np.float32)


def _zero_channels(proto: onnx.ModelProto, every: int = 10) -> onnx.ModelProto:
    """A copy whose layers output exact zeros in channels c ≡ 3 (mod ``every``): the rows of every Conv
    filter and bias and of the per-channel constants of Mul/Add. The same channels in every layer, so residual
    groups are dead in all their members: prune at ratio 0 must remove them and leave the outputs unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    init = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type not in ("Conv", "Mul", "Add") or any(a.name == "group" and a.i != 1 for a in node.attribute):
            continue
        for name in node.input[1:] if node.op_type == "Conv" else node.input:
            if name in init and init[name].dims and init[name].dims[0] > 1:
                values = numpy_helper.to_array(init[name]).copy()
                values[3::every] = 0
                init[name].CopyFrom(numpy_helper.from_array(values, name))
    return out


def _close(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> None:
    feeds = feeds or random_feeds(a)
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(x).max())))


# ---------------------------------------------------------------------------------------------- small nets
def _nhwc_residual(head: str, dead: tuple[int, ...] = ()) -> onnx.ModelProto:
    """X[1,8,8,3] (NHWC) ─ Transpose ─ a: Conv(8) ─ Transpose(NHWC) ─ Add(bias on the last axis) ─ Relu
    ─ Transpose(NCHW) ─ b: Conv(8) ─ Add(residual) ─ Transpose(NHWC) ─ head ─ Y, head being one of the
    classifier forms tf2onnx emits: ReduceMean + MatMul, or Reshape(flatten NHWC) + MatMul."""
    heads = {
        "mean": ("p = ReduceMean <axes = [1, 2], keepdims = 0> (t)\n  Y = MatMul (p, Wf)", (8, 5)),
        "flatten": ("p = Reshape (t, shape)\n  Y = MatMul (p, Wf)", (8 * 8 * 8, 5)),
        "squeeze": ("m = ReduceMean <axes = [1, 2], keepdims = 1> (t)\n  p = Squeeze (m, sq)\n  Y = MatMul (p, Wf)",
                    (8, 5)),
    }
    text, wf = heads[head]
    weights = {"Wa": _w(8, 3, 3, 3), "Ba": _w(8), "Wb": _w(8, 8, 3, 3), "Bb": _w(8, seed=1)}
    for name in weights:
        weights[name][list(dead)] = 0
    return model_from_text(
        f"""{HEADER}
        g (float[1,8,8,3] X) => (float[1,5] Y) {{
          x = Transpose <perm = [0, 3, 1, 2]> (X)
          c = Conv <pads = [1, 1, 1, 1]> (x, Wa)
          n = Transpose <perm = [0, 2, 3, 1]> (c)
          s = Add (n, Ba)
          r = Relu (s)
          q = Transpose <perm = [0, 3, 1, 2]> (r)
          d = Conv <pads = [1, 1, 1, 1]> (q, Wb, Bb)
          e = Add (d, q)
          t = Transpose <perm = [0, 2, 3, 1]> (e)
          {text}
        }}
        """,
        {**weights, "Wf": _w(*wf), "shape": np.array([1, -1], np.int64), "sq": np.array([1, 2], np.int64)},
    )


@pytest.mark.parametrize("head", ["mean", "flatten", "squeeze"])
def test_nhwc_residual_net_prunes_exactly(head: str) -> None:
    proto = _nhwc_residual(head, dead=(2, 5))
    out, result = apply_pass(_prune(ratio=0.0), proto)
    onnx.checker.check_model(out)
    _close(proto, out)
    # a and b share the residual: its 2 zeroed channels (in both) go; the classifier is a graph output.
    assert result.stats["groups_declined"] == 1 and result.stats["channels_removed"] == 2
    kept = [layer.figures["channels_after"] for layer in result.layers if layer.op_type == "Conv"]
    assert kept == [6, 6]
    assert analyze(out).totals["params"] < analyze(proto).totals["params"]


def test_nhwc_flatten_removes_strided_features() -> None:
    """Flattening [1,8,8,C] puts channel c at features c, c+C, c+2C, …: a stride, not a block."""
    proto = _nhwc_residual("flatten", dead=(2, 5))
    out, _ = apply_pass(_prune(ratio=0.0), proto)
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    fc = next(n for n in out.graph.node if n.op_type == "MatMul")
    new = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == fc.input[1]))
    gone = [f for f in range(8 * 8 * 8) if f % 8 in (2, 5)]
    np.testing.assert_array_equal(new, np.delete(init["Wf"], gone, axis=0))


def test_transpose_at_ratio_prunes_the_same_channels_as_the_nchw_twin() -> None:
    """With the Transposes of the NHWC twin removed (NCHW throughout), the same channels go at ratio 0.5."""
    nhwc = _nhwc_residual("mean")
    nchw = model_from_text(
        f"""{HEADER}
        g (float[1,3,8,8] X) => (float[1,5] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, Wa)
          s = Add (c, Ba)
          q = Relu (s)
          d = Conv <pads = [1, 1, 1, 1]> (q, Wb, Bb)
          e = Add (d, q)
          p = ReduceMean <axes = [2, 3], keepdims = 0> (e)
          Y = MatMul (p, Wf)
        }}
        """,
        {"Wa": _w(8, 3, 3, 3), "Ba": _w(8).reshape(8, 1, 1), "Wb": _w(8, 8, 3, 3), "Bb": _w(8, seed=1), "Wf": _w(8, 5)},
    )
    out_a, ra = apply_pass(_prune(ratio=0.5), nhwc)
    out_b, rb = apply_pass(_prune(ratio=0.5), nchw)
    assert ra.stats == rb.stats and ra.stats["channels_removed"] == 4
    assert analyze(out_a).totals["params"] == analyze(out_b).totals["params"]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out_a, {"X": x.transpose(0, 2, 3, 1)})[0], run(out_b, {"X": x})[0], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize(
    ("target", "declined"),
    [([1, 64, 8], False), ([1, 8, 8, 8], False), ([1, 8, 64], False), ([1, 4, 128], True), ([1, 64, 2, 4], True)],
)
def test_reshape_keeps_or_loses_the_channel_axis(target: list[int], declined: bool) -> None:
    """[1,8,8,C=8] NHWC: [1,64,8] merges H·W and keeps C; [1,8,64] merges W and C whole (channel c is
    every 8th feature); [1,4,128] splits H and mixes half of it with C; [1,64,2,4] splits C. Only a kept or
    whole-merged channel axis is followed."""
    last = target[-1]
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,3,8,8] X) => (float[{",".join(str(d) for d in target[:-1])},3] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, Wa, Ba)
          n = Transpose <perm = [0, 2, 3, 1]> (c)
          r = Reshape (n, shape)
          Y = MatMul (r, Wf)
        }}
        """,
        {"Wa": _w(8, 3, 3, 3), "Ba": _w(8), "shape": np.array(target, np.int64), "Wf": _w(last, 3)},
    )
    zeroed = _zero_channels(proto, 4)
    out, result = apply_pass(_prune(ratio=0.0), zeroed)
    _close(zeroed, out)
    assert result.stats["groups_declined"] == (2 if declined else 1)
    assert result.stats["channels_removed"] == (0 if declined else 2)


def test_after_cancel_transposes_still_prunes() -> None:
    """The example plugin pushes Transposes through Relu/Add (full-rank constants) and merges pairs."""
    plugin = pytest.importorskip("nnopt_example_plugin.cancel_transposes")
    proto = _nhwc_residual("mean", dead=(2, 5))
    pushed, moved = apply_pass(plugin.CancelTransposes(), proto)
    assert moved.modified
    assert sum(n.op_type == "Transpose" for n in pushed.graph.node) < sum(
        n.op_type == "Transpose" for n in proto.graph.node)
    out, result = apply_pass(_prune(ratio=0.0), pushed)
    _close(proto, out)
    assert result.stats["groups_declined"] == 1 and result.stats["channels_removed"] == 2


# ---------------------------------------------------------------------------------------------- ResNet-50
def light_resnet50(layout: str, size: int = 64, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 from the onnx wheel's ``light_resnet50.onnx`` (weights are ConstantOfShape there) with
    seeded He-initialised weights, BatchNormalization as a per-channel Mul + Add (as TF exports a frozen
    BN), residual Add, and a global-average head. ``layout``:

    - ``nchw``: … ─ GlobalAveragePool ─ Flatten ─ Gemm.
    - ``nhwc``: X[1,S,S,3] ─ Transpose(0,3,1,2) ─ … ─ Transpose(0,2,3,1) ─ ReduceMean(1,2) ─ MatMul ─ Add.
    - ``nhwc_wrapped``: every tensor NHWC; each Conv and MaxPool between a Transpose to NCHW and one back,
      scale/shift constants on the last axis: tf2onnx's op-by-op conversion before any Transpose optimisation.
    """
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    src = onnx.load(path)
    shapes = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    # Weights are ConstantOfShape outputs, initializers or bare graph inputs (BN scale/shift): all get values.
    dims_of = {t.name: list(t.dims) for t in src.graph.initializer}
    dims_of.update({x.name: [d.dim_value for d in x.type.tensor_type.shape.dim] for x in src.graph.input})
    dims_of.update({n.output[0]: [int(d) for d in shapes[n.input[0]]] for n in src.graph.node
                    if n.op_type == "ConstantOfShape"})
    rng = np.random.default_rng(seed)
    body = []
    for node in src.graph.node:
        if node.op_type == "AveragePool":  # replaced by a global-average head below
            break
        body += [] if node.op_type == "ConstantOfShape" else [node]
    produced = {o for n in body for o in n.output} | {body[0].input[0]}
    values = {name: _he(name, dims_of[name], rng)
              for name in [*dict.fromkeys(x for n in body for x in n.input if x not in produced),
                           "gpu_0/pred_w_0", "gpu_0/pred_b_0"]}
    wrapped = layout == "nhwc_wrapped"
    inits: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []
    for node in body:
        ins, outs = list(node.input), list(node.output)
        if node.op_type == "BatchNormalization":
            gamma, beta, mean, var = (values[x] for x in ins[1:])
            scale = gamma / np.sqrt(var + 1e-5)
            shape = (-1,) if wrapped else (-1, 1, 1)
            inits[outs[0] + "_s"] = scale.reshape(shape).astype(np.float32)
            inits[outs[0] + "_b"] = (beta - mean * scale).reshape(shape).astype(np.float32)
            nodes += [helper.make_node("Mul", [ins[0], outs[0] + "_s"], [outs[0] + "_m"]),
                      helper.make_node("Add", [outs[0] + "_m", outs[0] + "_b"], outs)]
            continue
        inits.update({x: values[x] for x in ins[1:] if x in values})
        op = "Add" if node.op_type == "Sum" else node.op_type  # as tf2onnx spells a residual
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if wrapped and op in ("Conv", "MaxPool"):
            nodes += [helper.make_node("Transpose", ins[:1], [ins[0] + "_nchw" + outs[0]], perm=[0, 3, 1, 2]),
                      helper.make_node(op, [ins[0] + "_nchw" + outs[0], *ins[1:]], [outs[0] + "_nchw"], **attrs),
                      helper.make_node("Transpose", [outs[0] + "_nchw"], outs, perm=[0, 2, 3, 1])]
        else:
            nodes.append(helper.make_node(op, ins, outs, **attrs))
    first, last = body[0].input[0], body[-1].output[0]
    w, b = values["gpu_0/pred_w_0"], values["gpu_0/pred_b_0"]
    if layout == "nchw":
        x = helper.make_tensor_value_info(first, onnx.TensorProto.FLOAT, [1, 3, size, size])
        nodes += [helper.make_node("GlobalAveragePool", [last], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["Y"], transB=1)]
        inits.update({"fc_w": w, "fc_b": b})
    else:
        x = helper.make_tensor_value_info(first if wrapped else "X", onnx.TensorProto.FLOAT, [1, size, size, 3])
        if not wrapped:
            nodes.insert(0, helper.make_node("Transpose", ["X"], [first], perm=[0, 3, 1, 2]))
            nodes.append(helper.make_node("Transpose", [last], ["nhwc"], perm=[0, 2, 3, 1]))
        nodes += [helper.make_node("ReduceMean", [last if wrapped else "nhwc"], ["pooled"], axes=[1, 2], keepdims=0),
                  helper.make_node("MatMul", ["pooled", "fc_w"], ["fc"]),
                  helper.make_node("Add", ["fc", "fc_b"], ["Y"])]
        inits.update({"fc_w": np.ascontiguousarray(w.T), "fc_b": b})
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type.lower()}_{i}"
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 1000])
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, f"resnet50_{layout}", [x], [y], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _he(name: str, dims: list[int], rng: np.random.Generator) -> np.ndarray:
    """Weights by role (the Caffe2 names): He-normal filters, BN statistics near identity."""
    if name.endswith("_bn_s_0"):
        return rng.uniform(0.5, 1.0, dims).astype(np.float32)
    if name.endswith("_bn_riv_0"):
        return rng.uniform(0.5, 1.5, dims).astype(np.float32)
    if len(dims) == 1:
        return (0.1 * rng.standard_normal(dims)).astype(np.float32)
    fan_in = int(np.prod(dims[1:]))
    return (rng.standard_normal(dims) * np.sqrt(2.0 / fan_in)).astype(np.float32)


@pytest.mark.slow
def test_resnet50_nhwc_prunes_like_its_nchw_twin() -> None:
    """Every ResNet-50 group (the classifier, a graph output, excepted) prunes through the NHWC Transposes
    (54 of 54 groups were declined in the wrapped form before), both layouts end with the same parameter
    count and outputs, and the zeroed-channel check shows the edits are exact."""
    nchw, wrapped = light_resnet50("nchw", 32), light_resnet50("nhwc_wrapped", 32)
    out_a, ra = apply_pass(_prune(ratio=0.3), nchw)
    out_b, rb = apply_pass(_prune(ratio=0.3), wrapped)
    assert ra.stats == rb.stats
    assert rb.stats["groups"] == 38 and rb.stats["groups_pruned"] == 37 and rb.stats["channels_removed"] == 3417
    assert analyze(out_a).totals["params"] == analyze(out_b).totals["params"] == 13_013_424  # of 25_557_032
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    a, b = run(out_a, {nchw.graph.input[0].name: x})[0], run(out_b, {wrapped.graph.input[0].name: x.transpose(0, 2, 3, 1)})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    zeroed = _zero_channels(wrapped)
    exact, rz = apply_pass(_prune(ratio=0.0), zeroed)
    assert rz.stats["channels_removed"] == rz.stats["dead_channels_removed"] == 1156
    _close(zeroed, exact)


@pytest.mark.slow
def test_resnet50_after_cancel_transposes_prunes_the_same() -> None:
    plugin = pytest.importorskip("nnopt_example_plugin.cancel_transposes")
    wrapped = light_resnet50("nhwc_wrapped", 32)
    pushed, moved = apply_pass(plugin.CancelTransposes(), wrapped)
    assert moved.modified
    out, result = apply_pass(_prune(ratio=0.3), pushed)
    assert result.stats["groups_pruned"] == 37 and result.stats["channels_removed"] == 3417
    assert analyze(out).totals["params"] == 13_013_424
    zeroed, _ = apply_pass(plugin.CancelTransposes(), _zero_channels(wrapped))
    exact, rz = apply_pass(_prune(ratio=0.0), zeroed)
    assert rz.stats["channels_removed"] == 1156
    _close(zeroed, exact)


@pytest.mark.slow
def test_ppocr_rec_prunes_through_its_squeeze_exactly() -> None:
    """PP-OCR rec (SVTR neck: Squeeze, Transpose, Reshape, MatMul): the group that a Squeeze declined before
    now prunes; zeroing the 30 % lowest-norm output channels of every Conv/MatMul, prune at ratio 0 removes
    the dead ones with unchanged outputs."""
    from realmodels import REAL_MODELS

    from nnopt.api import optimize
    from nnopt.pipeline.base import PassContext

    entry = next(m for m in REAL_MODELS if m.key == "ppocr_rec")
    path = entry.path()
    if path is None:
        pytest.skip(f"{entry.requirement} is not installed")
    cleaned, _ = optimize(str(path), input_shapes=entry.input_shapes, verify=False)
    proto = cleaned.to_proto()
    ctx = PassContext(input_shapes=entry.input_shapes)
    _, result = apply_pass(_prune(ratio=0.3, round_to=8), proto, ctx)
    assert result.stats["groups"] == 22 and result.stats["groups_declined"] == 1  # 2 before: a Shape, a Squeeze
    init = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        grouped = any(a.name == "group" and a.i != 1 for a in node.attribute)
        if node.op_type not in ("Conv", "MatMul") or grouped or node.input[1] not in init:
            continue
        w = numpy_helper.to_array(init[node.input[1]]).copy()
        if w.ndim != (4 if node.op_type == "Conv" else 2):
            continue
        rows = w if node.op_type == "Conv" else w.T  # a view: writing it zeroes w
        low = np.argsort(np.abs(rows).reshape(rows.shape[0], -1).sum(1), kind="stable")[: int(0.3 * rows.shape[0])]
        rows[low] = 0
        init[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in init:
            b = numpy_helper.to_array(init[node.input[2]]).copy()
            b[low] = 0
            init[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
    out, zeroed = apply_pass(_prune(ratio=0.0), proto, ctx)
    assert zeroed.stats["dead_channels_removed"] == zeroed.stats["channels_removed"] == 270  # 234 before
    _close(proto, out)
