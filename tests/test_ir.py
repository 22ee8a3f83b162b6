"""The IR round trip loses nothing: metadata, opsets, interface, functions, subgraphs, external data."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnopt.errors import ModelLoadError, UnsafeExternalDataError
from nnopt.ir.model import Model, load_model, save_model
from nnopt.testing import model_from_text, run


def _if_model_with_outer_initializer() -> onnx.ModelProto:
    """
    cond ──► If ──► y          then: y = x + W      (W is a top-level initializer used only here)
                               else: y = x * W
    """
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), "W")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["t_out"])], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "W"], ["e_out"])], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="the_if")],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_metadata_opsets_and_interface_survive():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1], producer_name: "maker",
         producer_version: "2.1", domain: "org.test", model_version: 7, doc_string: "model doc">
        g (float[N, 3, "H", 5] x) => (float[N, 3, "H", 5] y) {
          y = Relu(x)
        }
        """
    )
    proto.graph.doc_string = "graph doc"
    proto.graph.node[0].doc_string = "node doc"
    proto.graph.node[0].name = "relu"
    helper.set_model_props(proto, {"author": "someone", "license": "MIT"})
    out = Model.from_proto(proto).to_proto()
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.example", 1)}
    assert (out.ir_version, out.producer_name, out.producer_version) == (8, "maker", "2.1")
    assert (out.domain, out.model_version, out.doc_string) == ("org.test", 7, "model doc")
    assert out.graph.doc_string == "graph doc"
    assert out.graph.node[0].doc_string == "node doc"
    assert {(p.key, p.value) for p in out.metadata_props} == {("author", "someone"), ("license", "MIT")}
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", 5]
    assert out.graph.output[0].name == "y"


def test_model_local_functions_survive_and_run():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) {
          y = local.Double(x)
        }
        <domain: "local", opset_import: ["" : 17]>
        Double (a) => (b) {
          b = Add(a, a)
        }
        """
    )
    out = Model.from_proto(proto).to_proto()
    assert [f.name for f in out.functions] == ["Double"]
    x = np.array([1.0, -2.0], dtype=np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], 2 * x)


def test_outer_initializer_used_only_by_if_branches_stays_top_level_once():
    proto = _if_model_with_outer_initializer()
    out = Model.from_proto(proto).to_proto()
    onnx.checker.check_model(out)
    assert [t.name for t in out.graph.initializer] == ["W"]
    for attr in out.graph.node[0].attribute:
        assert len(attr.g.initializer) == 0
    x = np.ones((2, 2), np.float32)
    w = np.arange(4, dtype=np.float32).reshape(2, 2)
    np.testing.assert_array_equal(run(out, {"cond": np.array(True), "x": x})[0], x + w)
    np.testing.assert_array_equal(run(out, {"cond": np.array(False), "x": x})[0], x * w)


def test_initializer_that_is_also_an_input_stays_an_overridable_input():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x, float[2] bias) => (float[2] y) {
          y = Add(x, bias)
        }
        """,
        {"bias": np.array([1.0, 2.0], np.float32)},
    )
    model = Model.from_proto(proto)
    assert [t.name for t in model.graph.inputs] == ["x", "bias"]
    out = model.to_proto()
    assert [i.name for i in out.graph.input] == ["x", "bias"]
    assert [t.name for t in out.graph.initializer] == ["bias"]


def test_ir3_initializers_are_listed_as_inputs():
    proto = model_from_text(
        """
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[2] x, float[2] w) => (float[2] y) {
          y = Mul(x, w)
        }
        """,
        {"w": np.array([3.0, 4.0], np.float32)},
    )
    out = Model.from_proto(proto).to_proto()
    onnx.checker.check_model(out)
    assert [i.name for i in out.graph.input] == ["x", "w"]


def test_load_from_path_and_proto_give_the_same_model(tmp_path):
    proto = _if_model_with_outer_initializer()
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, str(path))
    a = load_model(path).to_proto().SerializeToString()
    b = load_model(proto).to_proto().SerializeToString()
    assert a == b


def test_external_data_round_trip_and_atomic_save(tmp_path):
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4096] x) => (float[4096] y) {
          y = Add(x, big)
        }
        """,
        {"big": np.arange(4096, dtype=np.float32)},
    )
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save_model(proto, str(src_dir / "m.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    model = load_model(src_dir / "m.onnx")
    assert model.external_data
    out_dir = tmp_path / "out"
    save_model(model, out_dir / "o.onnx")
    names = sorted(os.listdir(out_dir))  # no temporary files left behind; the data file is named by content
    assert len(names) == 2 and names[0] == "o.onnx" and re.fullmatch(r"o\.onnx\.[0-9a-f]{16}\.data", names[1])
    assert (out_dir / "o.onnx").stat().st_size < 4096  # weights are in the data file
    again = load_model(out_dir / "o.onnx")
    x = np.ones(4096, np.float32)
    np.testing.assert_array_equal(run(again.to_proto(), {"x": x})[0], x + np.arange(4096, dtype=np.float32))


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) {
          y = Add(x, w)
        }
        """,
        {"w": np.ones(4, np.float32)},
    )
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    t = proto.graph.initializer[0]
    t.ClearField("float_data")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")
    onnx.save_model(proto, str(model_dir / "m.onnx"))
    with pytest.raises(UnsafeExternalDataError, match="outside the model's folder"):
        load_model(model_dir / "m.onnx")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an ONNX model"),
        (b"this is plain text, not a protobuf\n" * 3, "not"),
        (None, "no such file"),
    ],
)
def test_bad_files_raise_model_load_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_truncated_model_is_refused(tmp_path):
    proto = _if_model_with_outer_initializer()
    data = proto.SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_checker_rejection_is_a_load_error(tmp_path):
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
          y = Relu(x)
        }
        """
    )
    proto.graph.node[0].input[0] = "nowhere"
    path = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(path))
    with pytest.raises(ModelLoadError, match="checker"):
        load_model(path)


def test_restore_returns_to_snapshot():
    proto = _if_model_with_outer_initializer()
    model = Model.from_proto(proto)
    snap = model.to_proto()
    model.graph.nodes.clear()
    model.restore(snap)
    assert model.to_proto().SerializeToString() == snap.SerializeToString()
