"""Slow: a model over 2 GiB loads, optimizes and saves with external data, and still runs."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnopt.cli import main
from nnopt.ir.model import load_model
from nnopt.runtime import make_session

pytestmark = pytest.mark.large

ELEMENTS = 190_000_000  # 760 MB of float32 per weight, three weights: 2.28 GB


def test_model_over_2gb_round_trips_with_external_data(tmp_path):
    """
    w0, w1, w2 (760 MB each) ─► Gather([0..3]) each ─► Add ─► Add ─► y ;  plus a dead Neg node
    """
    weights = [numpy_helper.from_array(np.full(ELEMENTS, i + 1, np.float32), f"w{i}") for i in range(3)]
    idx = numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx")
    nodes = [helper.make_node("Gather", [f"w{i}", "idx"], [f"g{i}"]) for i in range(3)]
    nodes += [
        helper.make_node("Add", ["g0", "g1"], ["s"]),
        helper.make_node("Add", ["s", "g2"], ["t"]),
        helper.make_node("Add", ["t", "x"], ["y"]),
        helper.make_node("Neg", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], weights + [idx])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(proto, str(src / "big.onnx"), save_as_external_data=True, location="big.data")
    del proto, weights, graph
    out = tmp_path / "out" / "big.opt.onnx"
    assert main(["optimize", str(src / "big.onnx"), "-o", str(out), "-p", "dce"]) == 0
    names = sorted(os.listdir(out.parent))  # the data file is named after its content
    assert len(names) == 2 and names[0] == "big.opt.onnx" and re.fullmatch(r"big\.opt\.onnx\.[0-9a-f]{16}\.data", names[1])
    assert (out.parent / names[1]).stat().st_size >= 3 * ELEMENTS * 4
    model = load_model(out)
    result = model.to_proto()
    assert "Neg" not in [n.op_type for n in result.graph.node]
    sess = make_session(result)
    np.testing.assert_array_equal(sess.run(None, {"x": np.zeros(4, np.float32)})[0], np.full(4, 6, np.float32))
