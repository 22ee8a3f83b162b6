"""strip-debug-info: per-node doc strings and metadata go (subgraphs too), model-level metadata stays."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cli import main
from nnopt.errors import OptionError
from nnopt.ir.model import Model, load_model, save_model
from nnopt.passes.strip_debug_info import StripDebugInfo, StripDebugInfoOptions
from nnopt.pipeline.base import PassContext
from nnopt.pipeline.spec import DEFAULT_PIPELINE
from nnopt.plugin_manager import build_plugins
from nnopt.testing import apply_pass, assert_lossless, model_from_text, run

PLUGINS = build_plugins(load_entry_points=False)

MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] X, bool c) => (float[2,3] Y) {
  r = Relu(X)
  Y = If (c) <
    then_branch = t () => (float[2,3] a) {
      a = Neg(r)
    },
    else_branch = e () => (float[2,3] b) {
      b = Sigmoid(r)
    }
  >
}
"""

#: What the PyTorch exporter writes per node (shortened), by node name.
NODE_METADATA = {
    "relu": [("namespace", "model.act"), ("pkg.torch.onnx.stack_trace", 'File "model.py", line 12\n  x = relu(x)')],
    "neg": [("namespace", "model.branch"), ("pkg.torch.onnx.fx_node", "%neg : [num_users=1] = call_function")],
    "sigmoid": [("pkg.torch.onnx.stack_trace", 'File "model.py", line 20\n  x = sigmoid(x)')],
}
NODE_DOCS = {"relu": "a documented relu", "neg": "negates"}
MODEL_METADATA = [("license", "MIT"), ("labels", "speech,silence")]


def _debug_model() -> onnx.ModelProto:
    """MODEL with named nodes, per-node doc strings and metadata (also in both If branches), model metadata."""
    proto = model_from_text(MODEL)
    main_nodes = list(proto.graph.node)
    branches = {a.name: a.g for a in main_nodes[1].attribute}
    nodes = [main_nodes[0], main_nodes[1], branches["then_branch"].node[0], branches["else_branch"].node[0]]
    for node, name in zip(nodes, ["relu", "if", "neg", "sigmoid"]):
        node.name = name
        if name in NODE_DOCS:  # NOTE: proto2 writes a field assigned even "", so only real doc strings
            node.doc_string = NODE_DOCS[name]
        for key, value in NODE_METADATA.get(name, []):
            node.metadata_props.add(key=key, value=value)
    proto.doc_string = "model doc"
    proto.graph.doc_string = "graph doc"
    for key, value in MODEL_METADATA:
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


def _node_props(proto: onnx.ModelProto) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    return {n.name: (n.doc_string, [(p.key, p.value) for p in n.metadata_props]) for n in _all_nodes(proto.graph)}


def test_strips_every_node_and_keeps_model_metadata():
    proto = _debug_model()
    out, result = assert_lossless(StripDebugInfo(), proto)
    assert _node_props(out) == {name: ("", []) for name in ("relu", "if", "neg", "sigmoid")}
    assert out.doc_string == "model doc" and out.graph.doc_string == "graph doc"
    assert [(p.key, p.value) for p in out.metadata_props] == MODEL_METADATA
    assert result.modified
    # The If node itself carries nothing: three nodes stripped, two of them in subgraphs.
    assert result.stats == {
        "nodes_stripped": 3,
        "doc_strings_removed": 2,
        "metadata_entries_removed": 5,
        "metadata_entries_kept": 0,
        "bytes_removed": result.stats["bytes_removed"],
    }
    assert [(e.node, e.figures["doc_string"], e.figures["metadata_removed"]) for e in result.layers] == [
        ("relu", True, ["namespace", "pkg.torch.onnx.stack_trace"]),
        ("neg", True, ["namespace", "pkg.torch.onnx.fx_node"]),
        ("sigmoid", False, ["pkg.torch.onnx.stack_trace"]),
    ]
    # Reported: the bytes of exactly those fields, as the input serialised them.
    debug_only = [onnx.NodeProto(metadata_props=n.metadata_props) for n in _all_nodes(proto.graph)]
    for node, original in zip(debug_only, _all_nodes(proto.graph)):
        if original.HasField("doc_string"):
            node.doc_string = original.doc_string
    assert result.stats["bytes_removed"] == sum(n.ByteSize() for n in debug_only) == 286
    assert result.stats["bytes_removed"] == sum(e.figures["bytes_removed"] for e in result.layers)
    # The file loses that and a few bytes more: the length prefixes of the enclosing If node and branch
    # graphs shrink, and Model.to_proto writes an empty doc_string field (2 bytes) for sigmoid while it has
    # metadata.
    roundtrip = Model.from_proto(proto).to_proto()
    shrink = roundtrip.ByteSize() - out.ByteSize()
    assert 0 <= shrink - result.stats["bytes_removed"] <= 6, shrink


def test_bytes_removed_is_exact_in_the_main_graph():
    proto = model_from_text('<ir_version: 8, opset_import: ["" : 17]>\ng (float[4] X) => (float[4] Y) {\n Y = Relu(X)\n}')
    proto.graph.node[0].name = "relu"
    proto.graph.node[0].doc_string = "d" * 300  # a length prefix of two bytes
    proto.graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="s" * 1000)
    out, result = apply_pass(StripDebugInfo(), proto)
    # doc_string: tag + 2-byte length + 300; entry: tag + 2-byte length + (tag + 1 + 26) + (tag + 2 + 1000)
    assert result.stats["bytes_removed"] == (1 + 2 + 300) + (1 + 2 + (1 + 1 + 26) + (1 + 2 + 1000)) == 1337
    # The file loses one byte more each for the node's and the graph's length prefixes (now below 128).
    assert Model.from_proto(proto).to_proto().ByteSize() - out.ByteSize() == 1337 + 2


def test_keep_patterns_keep_those_keys_only():
    proto = _debug_model()
    strip = StripDebugInfo(StripDebugInfoOptions.from_strings({"keep": "namespace,pkg.torch.onnx.fx_*"}, "x"))
    out, result = assert_lossless(strip, proto)
    assert _node_props(out) == {
        "relu": ("", [("namespace", "model.act")]),
        "if": ("", []),
        "neg": ("", [("namespace", "model.branch"), ("pkg.torch.onnx.fx_node", "%neg : [num_users=1] = call_function")]),
        "sigmoid": ("", []),
    }
    assert (result.stats["metadata_entries_removed"], result.stats["metadata_entries_kept"]) == (2, 3)
    assert result.stats["nodes_stripped"] == 3  # neg keeps all its metadata but loses its doc string
    assert result.layers[1].to_dict() == {
        "node": "neg", "op_type": "Neg", "action": "stripped", "doc_string": True, "metadata_removed": [],
        "bytes_removed": len(onnx.NodeProto(doc_string="negates").SerializeToString()), "metadata_kept":
        ["namespace", "pkg.torch.onnx.fx_node"],
    }


def test_second_run_changes_nothing():
    """What the fixed-point iteration relies on: once stripped, the pass reports no change (kept keys too)."""
    for keep in ((), ("namespace",)):
        model = Model.from_proto(_debug_model())
        strip = StripDebugInfo(StripDebugInfoOptions(keep=keep))
        assert strip.run(model, PassContext()).modified
        first = model.to_proto().SerializeToString()
        again = strip.run(model, PassContext())
        assert not again.modified and again.layers == [] and again.stats["bytes_removed"] == 0
        assert model.to_proto().SerializeToString() == first


def test_extras_of_removed_nodes_are_not_counted():
    model = Model.from_proto(_debug_model())
    relu = model.graph.nodes[0]
    model.graph.nodes[1].inputs[0] = model.graph.inputs[0]  # the If reads X itself; relu is dead
    relu.inputs.clear()
    relu.outputs.clear()
    model.graph.nodes.remove(relu)
    result = StripDebugInfo().run(model, PassContext())
    assert [e.node for e in result.layers] == ["neg", "sigmoid"]
    assert result.stats["metadata_entries_removed"] == 3 and model.node_extras == {}


def test_deterministic():
    proto = _debug_model()
    strip = StripDebugInfo(StripDebugInfoOptions(keep=("namespace",)))
    assert apply_pass(strip, proto)[0].SerializeToString() == apply_pass(strip, proto)[0].SerializeToString()


def test_bad_keep_values_are_refused():
    for bad in ({"keep": [""]}, {"keep": [" namespace"]}):
        with pytest.raises(OptionError, match=r"strip-debug-info:keep: .* is out of range: .* is not a metadata key"):
            StripDebugInfoOptions.from_values(bad, "strip-debug-info")
    with pytest.raises(OptionError, match=r"strip-debug-info:keep: expected a list of strings, got the number 3"):
        StripDebugInfoOptions.from_values({"keep": 3}, "strip-debug-info")


def test_bad_keep_in_a_pipeline_file_is_one_line_exit_2(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save_model(_debug_model(), str(src))
    config = tmp_path / "p.json"
    config.write_text(json.dumps({"passes": [{"name": "strip-debug-info", "keep": ["namespace", ""]}]}))
    code = main(["optimize", str(src), "-o", str(out), "--pipeline", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "passes[1].keep" in err and "is not a metadata key" in err, err


def test_default_pipeline_strips_first_and_converges(tmp_path):
    assert DEFAULT_PIPELINE[0] == "strip-debug-info" and DEFAULT_PIPELINE.count("strip-debug-info") == 1
    proto = _debug_model()
    model, report = optimize(proto, None, plugins=PLUGINS)
    out = model.to_proto()
    assert all(doc == "" and not props for doc, props in _node_props(out).values())
    assert [(p.key, p.value) for p in out.metadata_props] == MODEL_METADATA and out.doc_string == "model doc"
    strips = [r for r in report.passes if r.name == "strip-debug-info"]
    assert [(r.iteration, r.status) for r in strips] == [(0, "applied"), (1, "unchanged")]
    assert max(r.iteration for r in report.passes) == 1  # the second iteration found nothing: converged
    feeds = {"X": np.arange(-3, 3, dtype=np.float32).reshape(2, 3), "c": np.array(True)}
    for cond in (True, False):
        feeds["c"] = np.array(cond)
        for a, b in zip(run(proto, feeds), run(out, feeds)):
            np.testing.assert_array_equal(b, a)


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_silero_vad_loses_its_exporter_debug_info(tmp_path):
    """The PyTorch exporter's per-node metadata is a fifth of silero_vad_op18_ifless; `default` drops it."""
    from realmodels import REAL_MODELS, write_data

    spec = next(m for m in REAL_MODELS if m.key == "silero_vad_op18_ifless")
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed (pip install --no-deps {spec.requirement})")
    data = write_data(spec, path, tmp_path / "data.npz")
    model, report = optimize(load_model(path), None, data=data, input_shapes=spec.input_shapes, plugins=PLUGINS)
    assert report.verification == "onnxruntime" and not report.rolled_back, report.format_table()
    strip = next(r for r in report.passes if r.name == "strip-debug-info")
    # 86 nodes (82 of them inside the If branches), five exporter keys each; 608 KB is the stack traces.
    assert strip.status == "applied"
    assert (strip.stats["nodes_stripped"], strip.stats["metadata_entries_removed"]) == (86, 430)
    assert strip.stats["bytes_removed"] == 637_788
    out = tmp_path / "out.onnx"
    save_model(model, out)
    ratio = out.stat().st_size / path.stat().st_size
    # Measured 0.7710 (2,193,948 of 2,845,718 bytes); onnxoptimizer gets 0.771, dce alone 0.995.
    assert ratio < 0.772, ratio
