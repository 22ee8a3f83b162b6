"""Build examples/small_cnn.onnx: a small CNN with the clutter real exports carry (run it to rebuild).

    x[N,3,32,32] → Conv3x3(3→16) → BatchNorm → Relu → Identity
                 → Conv3x3/2(16→32, weight in a Constant node) → BatchNorm → Relu → Dropout
                 → Conv1x1(32→32) → Relu → GlobalAveragePool → Flatten → Gemm(32→10) → Softmax → probs
    plus a dead branch (Neg of the first conv's output) that no output needs.

Weights are seeded random numbers: the model is for demonstrating and testing the optimizer, not for
classifying anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def f32(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    inits = {
        "conv1.w": f32(16, 3, 3, 3), "conv1.b": f32(16),
        "bn1.scale": (1 + f32(16, scale=0.1)), "bn1.bias": f32(16), "bn1.mean": f32(16, scale=0.1),
        "bn1.var": np.abs(1 + f32(16, scale=0.1)),
        "bn2.scale": (1 + f32(32, scale=0.1)), "bn2.bias": f32(32), "bn2.mean": f32(32, scale=0.1),
        "bn2.var": np.abs(1 + f32(32, scale=0.1)),
        "conv3.w": f32(32, 32, 1, 1), "conv3.b": f32(32),
        "fc.w": f32(10, 32), "fc.b": f32(10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["b1"],
                         name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["r1_id"], name="identity"),
        helper.make_node("Constant", [], ["conv2.w"], name="conv2.w.const",
                         value=numpy_helper.from_array(f32(32, 16, 3, 3), "conv2.w")),
        helper.make_node("Conv", ["r1_id", "conv2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"], ["b2"],
                         name="bn2", epsilon=1e-5),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("Dropout", ["r2"], ["d2"], name="dropout"),
        helper.make_node("Conv", ["d2", "conv3.w", "conv3.b"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
        helper.make_node("Neg", ["c1"], ["unused"], name="dead_branch"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nnopt-examples")
    model.ir_version = 8
    helper.set_model_props(model, {"description": "nnopt example model: a small CNN with unfused BN"})
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).with_name("small_cnn.onnx")
    onnx.save_model(build(), str(out))
    print(f"wrote {out}")
