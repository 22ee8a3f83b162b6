"""Hostile model files (issue 13): each load-side fault is a one-line input error (exit 2), nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.cli import main
from nnopt.errors import ModelLoadError
from nnopt.ir.model import load_model
from nnopt.testing import model_from_text

TEXT = """<ir_version: 8, opset_import: ["" : 13]>
g (float[2,3] x) => (float[3,2] y) { t = Add(x, w) y = Transpose<perm=[1,0]>(t) }"""


def _valid() -> onnx.ModelProto:
    return model_from_text(TEXT, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_refused(model: Path, capsys: pytest.CaptureFixture[str], *words: str) -> None:
    """optimize and analyze both exit 2 with one line naming the file and ``words``; nothing written or changed."""
    folder = model.parent
    before = _files(folder)
    out = folder.parent / "out" / "result.onnx"
    for argv in (["optimize", str(model), "-o", str(out)], ["analyze", str(model)]):
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, captured.err
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(f"nnopt: error: {model}: ")
        for word in words:
            assert word in lines[0]
        assert "internal error" not in captured.err
        assert not out.parent.exists()
        assert _files(folder) == before


def _save(proto: onnx.ModelProto, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(proto, str(path))
    return path


def _save_external(tmp_path: Path, edit: Callable[[onnx.TensorProto], None]) -> Path:
    """The valid model with its weight in ``m.onnx.data``, then ``edit`` applied to the weight's entries."""
    path = _save(_valid(), tmp_path)
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    (tensor,) = proto.graph.initializer
    edit(tensor)
    path.write_bytes(proto.SerializeToString())
    return path


def _set_entry(key: str, value: str) -> Callable[[onnx.TensorProto], None]:
    def edit(tensor: onnx.TensorProto) -> None:
        entries = {e.key: e for e in tensor.external_data}
        if key in entries:
            entries[key].value = value
        else:
            tensor.external_data.add(key=key, value=value)

    return edit


def test_the_valid_model_loads_both_ways(tmp_path: Path) -> None:
    # The baseline the hostile variants below are cut from: it loads with and without external data.
    assert load_model(_save(_valid(), tmp_path)).graph.outputs[0].name == "y"
    model = load_model(_save_external(tmp_path, lambda tensor: None))
    assert model.external_data
    np.testing.assert_array_equal(model.graph.tensors()["w"].values, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_unknown_data_type_of_an_initializer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = _valid()
    proto.graph.initializer[0].data_type = 999
    _assert_refused(_save(proto, tmp_path), capsys, "tensor 'w'", "unknown data type code 999")


def test_unknown_element_type_of_a_graph_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = _valid()
    proto.graph.input[0].type.tensor_type.elem_type = 999
    _assert_refused(_save(proto, tmp_path), capsys, "graph.input[0]", "unknown element type code 999")


@pytest.mark.parametrize(("key", "value"), [("offset", "abc"), ("offset", "-4"), ("length", "x"), ("length", "-1")])
def test_external_offset_or_length_not_a_byte_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    path = _save_external(tmp_path, _set_entry(key, value))
    _assert_refused(path, capsys, "tensor 'w'", f"external-data {key} '{value}'", "not a byte count")


def test_external_offset_past_the_end_of_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save_external(tmp_path, _set_entry("offset", "4096"))
    _assert_refused(path, capsys, "tensor 'w'", "offset 4096, past the end of 'm.onnx.data' (24 bytes)")


def test_external_data_file_too_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save_external(tmp_path, _set_entry("length", "24"))
    data = path.parent / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    _assert_refused(path, capsys, "tensor 'w'", "needs bytes 0..24 of 'm.onnx.data', which has 10 bytes")


def test_nul_byte_in_an_external_data_location(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save_external(tmp_path, _set_entry("location", "m.onnx\0.data"))
    _assert_refused(path, capsys, "tensor 'w'", "contains a NUL byte")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda p: setattr(p.graph.node[0], "name", "nodeAA"), "graph.node[0].name"),
        (lambda p: setattr(p, "doc_string", "nodeAA"), "model.doc_string"),
        (lambda p: p.metadata_props.add(key="k", value="nodeAA"), "model.metadata_props[0].value"),
    ],
)
def test_invalid_utf8_in_a_string_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[onnx.ModelProto], None], field: str
) -> None:
    proto = _valid()
    edit(proto)
    # The same length, so the protobuf framing stays valid: only the string's bytes are not UTF-8.
    data = proto.SerializeToString().replace(b"nodeAA", b"node\xff\xfe")
    path = _save(proto, tmp_path)
    path.write_bytes(data)
    _assert_refused(path, capsys, field, "is not valid UTF-8")


def test_an_attribute_list_with_no_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = _valid()
    proto.graph.node[1].name = "transpose"
    del proto.graph.node[1].attribute[0].ints[:]
    _assert_refused(_save(proto, tmp_path), capsys, "attribute 'perm' of node 'transpose'", "a list with no values")


def test_a_graph_with_no_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = _valid()
    del proto.graph.output[:]
    _assert_refused(_save(proto, tmp_path), capsys, "the graph has no outputs")
    with pytest.raises(ModelLoadError, match="the ModelProto: the graph has no outputs"):
        load_model(proto)


@pytest.mark.parametrize("length", ["10", None])
def test_external_data_shorter_than_the_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], length: str | None
) -> None:
    # Within the file's bounds, but fewer bytes than the shape needs (a length too small, or no length and
    # a truncated file): the checker lets it through and onnxruntime would reject what nnopt writes.
    def edit(tensor: onnx.TensorProto) -> None:
        kept = [e for e in tensor.external_data if e.key != "length"]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
        if length is not None:
            tensor.external_data.add(key="length", value=length)

    path = _save_external(tmp_path, edit)
    data = path.parent / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    _assert_refused(path, capsys, "tensor 'w' has 10 bytes of external data", "shape [2, 3] and type need 24")


def test_external_data_location_too_long_for_the_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _save_external(tmp_path, _set_entry("location", "a" * 5000))
    _assert_refused(path, capsys, "tensor 'w'", "cannot be read (File name too long)")


def test_a_negative_dimension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # onnxruntime aborts the process (a C++ assertion) running silero_vad with such an input dim.
    proto = _valid()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -5
    _assert_refused(_save(proto, tmp_path), capsys, "model.graph.input[0].type.tensor_type.shape.dim[0]",
                    "has negative dimension -5")
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # PP-OCR's way to say "unknown"
    assert load_model(proto).graph.inputs[0].shape[0] == -1


def test_a_shape_with_more_elements_than_64_bit_sizes_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before this check nnopt folded the dims into constants and wrote a model onnxruntime could not load.
    proto = _valid()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**62
    _assert_refused(_save(proto, tmp_path), capsys, "model.graph.input[0].type.tensor_type.shape has 1.38e+19",
                    "elements, more than 64-bit sizes can count in bytes")


def test_a_map_key_that_is_not_an_integer_or_a_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = _valid()
    proto.graph.output[0].type.CopyFrom(onnx.helper.make_map_type_proto(
        onnx.TensorProto.DOUBLE, onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])))
    _assert_refused(_save(proto, tmp_path), capsys, "model.graph.output[0].type.map_type has map key type code 11",
                    "keys must be integers or strings")


def test_an_attribute_string_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ONNX stores attribute strings as bytes; onnx-graphsurgeon decodes them as text.
    proto = _valid()
    proto.graph.node[0].name = "add"
    proto.graph.node[0].attribute.add(name="note", type=onnx.AttributeProto.STRING, s=b"\x80\x80")
    _assert_refused(_save(proto, tmp_path), capsys, "attribute 'note' of node 'add'", "is not valid UTF-8")


def _ml_model(node: onnx.NodeProto, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = onnx.helper.make_graph([node], "g", inputs, outputs)
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("ai.onnx.ml", 3)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(proto)
    return proto


def test_map_and_sequence_of_map_types_are_written_back_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ZipMap's seq(map(int64, float)) output (every scikit-learn classifier converted to ONNX has one)
    and a DictVectorizer's map input: graphsurgeon cannot represent either; nnopt writes them back as read."""
    float_map = onnx.helper.make_map_type_proto(
        onnx.TensorProto.INT64, onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, []))
    zipmap = _ml_model(
        onnx.helper.make_node("ZipMap", ["x"], ["y"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_value_info("y", onnx.helper.make_sequence_type_proto(float_map))])
    vectorizer = _ml_model(
        onnx.helper.make_node("DictVectorizer", ["m"], ["y"], domain="ai.onnx.ml", int64_vocabulary=[0, 1, 2]),
        [onnx.helper.make_value_info("m", float_map)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    for name, proto in (("zipmap", zipmap), ("vectorizer", vectorizer)):
        src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.out.onnx"
        onnx.save(proto, str(src))
        assert main(["optimize", str(src), "-o", str(out), "--no-provenance"]) == 0
        stdout = capsys.readouterr().out
        assert out.read_bytes() == src.read_bytes()
        if name == "vectorizer":  # a map cannot be generated: verification says so instead of failing
            assert "numerical verification skipped: cannot generate a value for input 'm' of type map(" in stdout


def _slice_of_a_shape_declared_minus_one() -> onnx.ModelProto:
    """Shape → Slice → Reshape, the Shape's output declared int64[-1]: PaddlePaddle's "unknown" in a place
    where onnx's own shape inference (data propagation) aborts the process on a failed C++ assertion."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Shape", ["x"], ["s"]),
         onnx.helper.make_node("Slice", ["s", "start", "end"], ["head"]),
         onnx.helper.make_node("Concat", ["head", "rest"], ["target"], axis=0),
         onnx.helper.make_node("Reshape", ["x", "target"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("start", 0), ("end", 1), ("rest", -1))],
        value_info=[onnx.helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [-1])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return proto


def test_a_minus_one_dim_where_onnx_would_abort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(_slice_of_a_shape_declared_minus_one(), tmp_path)
    out = tmp_path / "out.onnx"
    optimize = ["optimize", str(src), "-o", str(out)]
    for argv in (["analyze", str(src)], optimize, [*optimize, "-p", "dce"]):
        assert main(argv) == 0, capsys.readouterr().err
    assert "numerical verification skipped" not in capsys.readouterr().out
    # The declared -1 is read as unknown only while onnx and onnxruntime look; a pass leaving it keeps it.
    s = next(v for v in onnx.load(str(out)).graph.value_info if v.name == "s")
    assert s.type.tensor_type.shape.dim[0].dim_value == -1


def test_a_shape_operand_longer_than_any_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ONNX shape inference built a 2^40-dim output shape for the Expand, past 9 GB, before this check.
    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[1,3,1] x, int64[1099511627776] shape) => (float[1,3,1] y) { y = Expand(x, shape) }""")
    proto.graph.node[0].name = "expand"
    _assert_refused(_save(proto, tmp_path), capsys, "node 'expand' (Expand) takes its output rank from 'shape'",
                    "declared with 1,099,511,627,776 values (at most 1,024)")


@pytest.mark.parametrize("passes", [["-p", "prune:ratio=0.5"], ["-p", "svd"], ["-p", "conv-to-separable"]])
def test_a_4_bit_float_weight_is_saved_packed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               passes: list[str]) -> None:
    """A pass that reads a float4 weight (without changing it) once made the save fail: graphsurgeon wrote
    one byte per element where the type packs two."""
    example = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
    proto = onnx.load(str(example))
    weight = next(t for t in proto.graph.initializer if t.name == "conv1.w")
    values = np.clip(onnx.numpy_helper.to_array(weight), -6, 6)
    weight.CopyFrom(onnx.helper.make_tensor("conv1.w", onnx.TensorProto.FLOAT4E2M1, values.shape, values.ravel()))
    proto.opset_import[0].version, proto.ir_version = 23, 11
    src, out = _save(proto, tmp_path), tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "-q", *passes]) == 0, capsys.readouterr().err
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    (kept,) = [t for t in written.graph.initializer if t.name == "conv1.w"]
    assert kept.data_type == onnx.TensorProto.FLOAT4E2M1 and len(kept.raw_data) == values.size // 2
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept).astype(np.float32),
                                  onnx.numpy_helper.to_array(weight).astype(np.float32))
