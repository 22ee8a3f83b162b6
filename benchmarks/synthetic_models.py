"""Seeded synthetic ONNX models for the scale benchmark (benchmarks/scale.py).

``residual_net(target_nodes)``: a chain of ResNet-style blocks with the clutter real exports carry, sized
to about ``target_nodes`` nodes and small enough (12 channels, 8×8) that onnxruntime runs even the
40,000-node one in well under a second. Every block is

    Conv → BatchNormalization → Relu → Conv → BatchNormalization → Add(residual) → Mul(½) → Relu
    + Identity and Dropout no-ops (remove-noops), every block

and, in turn, one of these extras:

    Split → Relu, Sigmoid → Concat                        (channel groups: prune's Concat/Split groups)
    Reshape → Transpose → Transpose → Reshape             (shape plumbing; the Transposes cancel out)
    Constant × Constant → Mul                             (a scale in Constant nodes: fold-constants)
    Shape → Gather → Unsqueeze → Concat → Reshape          (a shape computation: Shape folding)
    Sigmoid → Tanh, whose output nothing reads             (a dead branch: dce)

The ½ after each residual Add keeps activations bounded through thousands of blocks (BatchNorm's fixed
statistics would not), so verification compares real numbers, not infs. A head (GlobalAveragePool →
Flatten → Gemm) ends the net.

``big_net()``: about 25 M parameters in a few large layers (3×3 convs of 256 and 512 channels, three
Gemms), for the passes whose time follows the weights (kmeans, svd, conv-to-separable, quantize).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
#: Channels and spatial size of the residual net: small, so running it is cheap at any depth, yet each
#: 3×3 conv weight (12·12·9 = 1,296 elements) is above kmeans' default min_size, so kmeans rewrites them all.
CHANNELS = 12
SIZE = 8
#: Nodes of a block without its extra (Conv, BN, Relu, Conv, BN, Add, Mul, Relu, Identity, Dropout).
_BLOCK_NODES = 10
#: Nodes of the head (GlobalAveragePool, Flatten, Gemm).
_HEAD_NODES = 3


class _Builder:
    """Collects nodes and initializers with unique, readable names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, values: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs

    def conv(self, x: str, cin: int, cout: int, k: int, name: str, gain: float, rank: int | None = None) -> str:
        if rank is None:
            # Scaled so each conv roughly keeps the activation norm at ``gain``.
            w = self.rng.standard_normal((cout, cin, k, k)) * gain / np.sqrt(cin * k * k)
        else:
            # A sum of ``rank`` separable terms (filter ⊗ channel ⊗ kernel) plus 2 % noise: a decaying spectrum
            # in every unfolding, like trained weights, so svd and conv-to-separable find savings. The
            # spectral norm of the [C_out, C_in·k²] unfolding is ``gain``.
            filters, channels, kernels = (self.rng.standard_normal((rank, d)) for d in (cout, cin, k * k))
            filters *= (0.5 ** np.arange(rank))[:, None]  # term r has weight 2^-r
            w = np.einsum("ro,ri,rk->oik", filters, channels, kernels)
            w = w + 0.02 * np.abs(w).mean() * self.rng.standard_normal(w.shape)
            w = (w * gain / np.linalg.norm(w.reshape(cout, -1), 2)).reshape(cout, cin, k, k)
        w = w.astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
        w_name, b_name = self.init(f"{name}.weight", w), self.init(f"{name}.bias", b)
        return self.node("Conv", [x, w_name, b_name], [f"{name}.out"], name, pads=[k // 2] * 4)[0]

    def batchnorm(self, x: str, channels: int, name: str) -> str:
        scale = (0.5 + 0.5 * self.rng.random(channels)).astype(np.float32)
        bias = (self.rng.standard_normal(channels) * 0.1).astype(np.float32)
        mean = (self.rng.standard_normal(channels) * 0.1).astype(np.float32)
        var = (0.5 + self.rng.random(channels)).astype(np.float32)
        names = [self.init(f"{name}.{p}", v) for p, v in
                 (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))]
        return self.node("BatchNormalization", [x, *names], [f"{name}.out"], name, epsilon=1e-5)[0]

    def constant(self, name: str, values: np.ndarray) -> str:
        return self.node("Constant", [], [name], f"{name}.node", value=numpy_helper.from_array(values, name))[0]

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name="nnopt-benchmarks")
        onnx.checker.check_model(model)
        return model


# ---------------------------------------------------------------------------------------------- extras
def _split_concat(b: _Builder, x: str, name: str) -> str:
    half = CHANNELS // 2
    split = b.init(f"{name}.split", np.array([half, half], dtype=np.int64))
    lo, hi = b.node("Split", [x, split], [f"{name}.lo", f"{name}.hi"], f"{name}.split", axis=1)
    lo = b.node("Relu", [lo], [f"{name}.lo_relu"], f"{name}.lo_relu")[0]
    hi = b.node("Sigmoid", [hi], [f"{name}.hi_sig"], f"{name}.hi_sig")[0]
    return b.node("Concat", [lo, hi], [f"{name}.cat"], f"{name}.concat", axis=1)[0]


def _reshape_transpose(b: _Builder, x: str, name: str) -> str:
    flat = b.init(f"{name}.flat_shape", np.array([1, CHANNELS, SIZE * SIZE], dtype=np.int64))
    back = b.init(f"{name}.back_shape", np.array([1, CHANNELS, SIZE, SIZE], dtype=np.int64))
    y = b.node("Reshape", [x, flat], [f"{name}.flat"], f"{name}.reshape")[0]
    y = b.node("Transpose", [y], [f"{name}.t"], f"{name}.transpose", perm=[0, 2, 1])[0]
    y = b.node("Transpose", [y], [f"{name}.tt"], f"{name}.transpose_back", perm=[0, 2, 1])[0]
    return b.node("Reshape", [y, back], [f"{name}.back"], f"{name}.reshape_back")[0]


def _constant_scale(b: _Builder, x: str, name: str) -> str:
    a = b.constant(f"{name}.a", (0.9 + 0.2 * b.rng.random((1, CHANNELS, 1, 1))).astype(np.float32))
    c = b.constant(f"{name}.c", np.array(1.0, dtype=np.float32))
    scale = b.node("Mul", [a, c], [f"{name}.scale"], f"{name}.scale")[0]
    return b.node("Mul", [x, scale], [f"{name}.scaled"], f"{name}.apply")[0]


def _shape_reshape(b: _Builder, x: str, name: str) -> str:
    index = b.init(f"{name}.index", np.array(1, dtype=np.int64))
    axes = b.init(f"{name}.axes", np.array([0], dtype=np.int64))
    rest = b.init(f"{name}.rest", np.array([1, -1, SIZE], dtype=np.int64))
    shape = b.node("Shape", [x], [f"{name}.shape"], f"{name}.shape")[0]
    ch = b.node("Gather", [shape, index], [f"{name}.ch"], f"{name}.gather", axis=0)[0]
    ch = b.node("Unsqueeze", [ch, axes], [f"{name}.ch1"], f"{name}.unsqueeze")[0]
    target = b.node("Concat", [rest, ch], [f"{name}.target"], f"{name}.target", axis=0)[0]
    y = b.node("Reshape", [x, target], [f"{name}.reshaped"], f"{name}.reshape")[0]
    back = b.init(f"{name}.back_shape", np.array([1, CHANNELS, SIZE, SIZE], dtype=np.int64))
    return b.node("Reshape", [y, back], [f"{name}.back"], f"{name}.reshape_back")[0]


def _dead_branch(b: _Builder, x: str, name: str) -> str:
    y = b.node("Sigmoid", [x], [f"{name}.dead_sig"], f"{name}.dead_sig")[0]
    b.node("Tanh", [y], [f"{name}.dead_tanh"], f"{name}.dead_tanh")
    return x


#: (builder, nodes it adds, initializers aside): the extras, used in turn.
_EXTRAS = [
    (_split_concat, 4),
    (_reshape_transpose, 4),
    (_constant_scale, 4),
    (_shape_reshape, 6),
    (_dead_branch, 2),
]
_NODES_PER_CYCLE = len(_EXTRAS) * _BLOCK_NODES + sum(n for _, n in _EXTRAS)


def _block(b: _Builder, x: str, index: int) -> str:
    name = f"b{index}"
    half = b.init(f"{name}.half", np.array(0.5, dtype=np.float32))
    y = b.conv(x, CHANNELS, CHANNELS, 3, f"{name}.conv1", gain=0.8, rank=3)
    y = b.batchnorm(y, CHANNELS, f"{name}.bn1")
    # Unnamed, as in many exports: passes must name or label such nodes without scanning the graph.
    y = b.node("Relu", [y], [f"{name}.relu1"], "")[0]
    y = b.node("Identity", [y], [f"{name}.id"], f"{name}.identity")[0]
    y = b.conv(y, CHANNELS, CHANNELS, 3, f"{name}.conv2", gain=0.8, rank=3)
    y = b.batchnorm(y, CHANNELS, f"{name}.bn2")
    y = b.node("Dropout", [y], [f"{name}.drop"], f"{name}.dropout")[0]
    y = b.node("Add", [x, y], [f"{name}.add"], f"{name}.add")[0]
    y = b.node("Mul", [y, half], [f"{name}.halved"], f"{name}.halve")[0]
    y = b.node("Relu", [y], [f"{name}.out"], f"{name}.relu2")[0]
    extra, _ = _EXTRAS[index % len(_EXTRAS)]
    return extra(b, y, f"{name}.x")


def residual_net(target_nodes: int, seed: int = 0) -> onnx.ModelProto:
    """About ``target_nodes`` nodes (within one block) of residual blocks; input X [1, 8, 8, 8], output Y [1, 10]."""
    blocks = max(1, round((target_nodes - _HEAD_NODES - 1) * len(_EXTRAS) / _NODES_PER_CYCLE))
    b = _Builder(seed)
    x = b.conv("X", CHANNELS, CHANNELS, 3, "stem", gain=1.0)
    for i in range(blocks):
        x = _block(b, x, i)
    x = b.node("GlobalAveragePool", [x], ["pool"], "pool")[0]
    x = b.node("Flatten", [x], ["flat"], "flatten")[0]
    w = b.init("head.weight", (b.rng.standard_normal((10, CHANNELS)) / np.sqrt(CHANNELS)).astype(np.float32))
    bias = b.init("head.bias", np.zeros(10, dtype=np.float32))
    b.node("Gemm", [x, w, bias], ["Y"], "head", transB=1)
    return b.model(
        f"residual_{target_nodes}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, CHANNELS, SIZE, SIZE])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 10])],
    )


def big_net(seed: int = 0) -> onnx.ModelProto:
    """About 25 M parameters: X [1, 3, 16, 16] → convs 3→256→512→512→512→512 (3×3, BN, Relu) → Gemms
    512→2048→4096→1700, with an Identity and a dead branch."""
    b = _Builder(seed)
    x, cin = "X", 3
    for i, cout in enumerate((256, 512, 512, 512, 512)):
        x = b.conv(x, cin, cout, 3, f"conv{i}", gain=1.0)
        x = b.batchnorm(x, cout, f"bn{i}")
        x = b.node("Relu", [x], [f"relu{i}"], f"relu{i}")[0]
        cin = cout
    _dead_branch(b, x, "tail")
    x = b.node("GlobalAveragePool", [x], ["pool"], "pool")[0]
    x = b.node("Flatten", [x], ["flat"], "flatten")[0]
    x = b.node("Identity", [x], ["flat_id"], "identity")[0]
    for i, (k, n) in enumerate(((512, 2048), (2048, 4096), (4096, 1700))):
        w = b.init(f"fc{i}.weight", (b.rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32))
        bias = b.init(f"fc{i}.bias", (b.rng.standard_normal(n) * 0.01).astype(np.float32))
        x = b.node("Gemm", [x, w, bias], [f"fc{i}"], f"fc{i}", transB=1)[0]
        if i < 2:
            x = b.node("Relu", [x], [f"fc{i}.relu"], f"fc{i}.relu")[0]
    b.nodes[-1].output[0] = "Y"
    return b.model(
        "big_25m",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1700])],
    )


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
