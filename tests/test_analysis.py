"""Shared analyses: activations on reference data, layer selection."""

from __future__ import annotations

import numpy as np

from nnopt.analysis.activations import collect_activations
from nnopt.analysis.selection import is_selected
from nnopt.testing import model_from_text


def test_collect_activations_returns_intermediate_values():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3] x) => (float[1, 3] y) {
          h = Relu(x)
          y = Neg(h)
        }
        """
    )
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    values = collect_activations(proto, ["h", "y"], [{"x": x}, {"x": -x}])
    np.testing.assert_array_equal(values["h"][0], np.maximum(x, 0))
    np.testing.assert_array_equal(values["h"][1], np.maximum(-x, 0))
    np.testing.assert_array_equal(values["y"][0], -np.maximum(x, 0))
    assert [o.name for o in proto.graph.output] == ["y"]  # the model itself is untouched


def test_layer_selection_patterns():
    assert is_selected("conv1")
    assert is_selected("backbone/conv1", nodes=["backbone/*"])
    assert not is_selected("head/conv1", nodes=["backbone/*"])
    assert not is_selected("backbone/conv1", exclude=["*conv1"])
    assert not is_selected("conv10", nodes=["conv1"])


def test_stable_topological_order_keeps_ties_in_index_order_and_reports_cycles():
    from nnopt.ir.graphview import stable_topological_order

    # 0 needs 2; 1 and 2 are free: 1 stays before 2, and 0 comes right after 2.
    assert stable_topological_order([{2}, set(), set()]) == [1, 2, 0]
    assert stable_topological_order([set(), {0}, {1}]) == [0, 1, 2]
    assert stable_topological_order([{1}, {0}]) is None
