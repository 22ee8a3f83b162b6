"""fix-input-shapes: dynamic input dims pinned to the pipeline's input shapes; the shape arithmetic then folds."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cli import main
from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.passes.fix_input_shapes import FixInputShapes
from nnopt.pipeline.base import PassContext
from nnopt.pipeline.spec import DEFAULT_PIPELINE
from nnopt.testing import model_from_text, run

#: What exporters write for ``x.reshape(batch, -1)`` on a dynamic batch: the batch dim read at run time.
MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 3] X) => (float[N, 12] Y) {
  s = Shape(X)
  zero = Constant<value = int64[1] {0}>()
  n = Gather<axis = 0>(s, zero)
  twelve = Constant<value = int64[1] {12}>()
  shape = Concat<axis = 0>(n, twelve)
  r = Reshape(X, shape)
  Y = Relu(r)
}
"""


def _dims(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}


def test_pinned_dims_let_the_default_pipeline_fold_the_shape_arithmetic() -> None:
    proto = model_from_text(MODEL)
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    out, report = optimize(proto, ["fix-input-shapes", *DEFAULT_PIPELINE], input_shapes={"X": [2, 4, 3]}, data=[{"X": x}])
    pinned = report.passes[0]
    assert pinned.status == "applied" and pinned.stats == {"inputs_pinned": 1}
    assert pinned.layers == [{"node": "X", "op_type": "", "action": "rewritten", "reason": "['N', 4, 3] -> [2, 4, 3]"}]
    written = out.to_proto()
    assert _dims(written) == {"X": [2, 4, 3]}
    # Shape -> Gather -> Concat folded into one constant shape: Reshape and Relu are left.
    assert [n.op_type for n in written.graph.node] == ["Reshape", "Relu"]
    np.testing.assert_array_equal(run(written, {"X": x})[0], run(proto, {"X": x})[0])
    # Without the pass the batch dim stays dynamic and the arithmetic stays.
    unpinned, _ = optimize(proto, list(DEFAULT_PIPELINE), input_shapes={"X": [2, 4, 3]}, data=[{"X": x}])
    assert _dims(unpinned.to_proto()) == {"X": ["N", 4, 3]} and len(unpinned.to_proto().graph.node) == 5


def test_without_input_shapes_nothing_changes_and_the_reason_says_why() -> None:
    model = Model.from_proto(model_from_text(MODEL))
    result = FixInputShapes().run(model, PassContext())
    assert not result.modified and "no input shapes given" in result.reason
    assert _dims(model.to_proto()) == {"X": ["N", 4, 3]}


def test_an_input_already_static_is_declined() -> None:
    model = Model.from_proto(model_from_text(MODEL.replace("float[N, 4, 3] X", "float[2, 4, 3] X")))
    result = FixInputShapes().run(model, PassContext(input_shapes={"X": [2, 4, 3]}))
    assert not result.modified and result.stats == {"inputs_pinned": 0}
    assert [(d.action, d.reason) for d in result.layers] == [("declined", "already static at the given shape")]


@pytest.mark.parametrize(("shapes", "message"), [
    ({"x": [2, 4, 3]}, "'x' is not a graph input (inputs: X)"),
    ({"X": [2, 12]}, "X has rank 3 (['N', 4, 3]), the given shape [2, 12] rank 2"),
    ({"X": [2, 4, 5]}, "X dim 2 is 3, the given shape says 5"),
])
def test_shapes_that_do_not_fit_the_inputs_are_option_errors(shapes: dict, message: str) -> None:
    model = Model.from_proto(model_from_text(MODEL))
    with pytest.raises(OptionError, match=re.escape(message)):
        FixInputShapes().run(model, PassContext(input_shapes=shapes))
    assert _dims(model.to_proto()) == {"X": ["N", 4, 3]}


def test_the_command_line_pins_the_shape_given_with_input_shape(tmp_path) -> None:
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model_from_text(MODEL), src)
    before = src.read_bytes()
    assert main(["optimize", str(src), "-o", str(dst), "--input-shape", "X=1,4,3", "-p", "fix-input-shapes"]) == 0
    assert _dims(onnx.load(dst)) == {"X": [1, 4, 3]} and src.read_bytes() == before
