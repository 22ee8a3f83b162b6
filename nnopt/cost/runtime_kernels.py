"""Kernel classes of nodes, and the onnxruntime graph optimisations the latency estimate models."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import onnx

from nnopt.analysis.shapes import has_subgraph
from nnopt.cost.hardware import EPILOGUE_KERNEL
from nnopt.cost.tensors import TensorInfo, norm_domain

#: Per op type (default domain, plus com.microsoft fused ops), the kernel class it runs as, and which input
#: is its weight (a weight that is not constant makes it ``dynamic_weight``; a Conv weight of shape
#: [C, 1, k...] with group > 1 makes it ``depthwise``; a dense Conv weight [C_out, C_in, k...] with
#: C_in >= ``_BLOCKED_MIN_CHANNELS`` not a multiple of ``_BLOCKED_ALIGNMENT``, or a 3-D kernel, makes it
#: ``unblocked_conv``; a 1-D kernel longer than 1, ``conv1d``).
#: Ops not listed are class "other". See ``nnopt.cost.hardware.KERNEL_CLASSES``.
_KERNEL_OF_OP: dict[tuple[str, str], tuple[str, int | None]] = {
    ("", "Conv"): ("conv", 1),
    ("com.microsoft", "FusedConv"): ("conv", 1),
    ("", "ConvTranspose"): ("conv", 1),
    ("", "Gemm"): ("conv", 1),
    ("", "MatMul"): ("conv", 1),
    ("", "Einsum"): ("conv", None),
    ("com.microsoft", "FusedGemm"): ("conv", 1),
    ("com.microsoft", "FusedMatMul"): ("conv", 1),
    ("", "QLinearConv"): ("int8", None),
    ("", "ConvInteger"): ("int8", None),
    ("", "QLinearMatMul"): ("int8_matmul", None),
    ("", "MatMulInteger"): ("int8_matmul", None),
    ("com.microsoft", "QGemm"): ("int8_matmul", None),
    ("com.microsoft", "QLinearAdd"): ("int8_elementwise", None),
    ("com.microsoft", "QLinearMul"): ("int8_elementwise", None),
    ("", "Div"): ("divide", None),
    ("", "Sigmoid"): ("activation", None),
    ("", "Tanh"): ("activation", None),
    ("", "HardSwish"): ("activation", None),
    ("", "LSTM"): ("recurrent", None),
    ("", "GRU"): ("recurrent", None),
    ("", "RNN"): ("recurrent", None),
    ("", "QuantizeLinear"): ("quantize", None),
    ("", "DequantizeLinear"): ("quantize", None),
}
#: The int8 kernel a QDQ group around each op runs as (see ``_fuse_qdq_groups``); Conv is ``int8``, or with
#: one input channel per group ``int8_depthwise``, or 1×1 with group 1 ``int8_pointwise``.
_QDQ_KERNEL = {"Conv": "int8", "MatMul": "int8_matmul", "Gemm": "int8_matmul", "Add": "int8_elementwise",
               "Mul": "int8_elementwise"}  # fmt: skip

#: onnxruntime's blocked-layout (NCHWc) convs take any input channel count below its block size (16 with
#: AVX-512, 8 with AVX2: the larger is used here) and multiples of 4 above it; other dense convs run as
#: im2col + GEMM (checked on the graphs onnxruntime 1.31 writes with ``optimized_model_filepath``).
_BLOCKED_MIN_CHANNELS = 16
_BLOCKED_ALIGNMENT = 4
_BLOCKABLE_OPS = frozenset({("", "Conv"), ("com.microsoft", "FusedConv")})
#: The weight rank of the convs the blocked layout takes (onnxruntime's NCHWc transformer: 2-D convs only;
#: 1-D and 3-D convs run as im2col + GEMM, measured 2-3 × slower than the dense rate says).
_BLOCKED_RANK = 4

#: Ops onnxruntime never constant-folds: DequantizeLinear (kept so that QDQ groups can fuse into int8
#: kernels; a weight-only DequantizeLinear therefore runs at every inference) and random generators.
_NOT_FOLDED = frozenset({"DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})  # fmt: skip
#: Ops that run on int8 data when every activation input comes from a DequantizeLinear and their output
#: goes only to a QuantizeLinear: onnxruntime drops the pair (QDQ selector/action transformers). Conv,
#: MatMul and Gemm become int8 kernels (QLinearConv, QLinearMatMul...) even without the trailing Q.
_QDQ_COMPUTE = frozenset({"Conv", "MatMul", "Gemm"})
_QDQ_OTHER = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Reshape", "Flatten", "Transpose",
                        "Squeeze", "Unsqueeze", "Gather", "Slice", "Resize", "Concat", "Add", "Mul", "Sigmoid",
                        "LeakyRelu", "Softmax", "Split"})  # fmt: skip
#: Epilogues onnxruntime fuses into the float Conv/Gemm/MatMul before them, when that node's output goes
#: nowhere else: per host op, the affine ops with constant operands folded into it first (ConvBNFusion,
#: ConvAddFusion, ConvMulFusion on a Conv whose weight is constant; MatMulAddFusion into a Gemm), then at
#: most one activation (ConvActivationFusion, GemmActivationFusion).
_EPILOGUE_AFFINE: dict[str, frozenset[str]] = {
    "Conv": frozenset({"BatchNormalization", "Add", "Mul"}),
    "Gemm": frozenset(),
    "MatMul": frozenset({"Add"}),
}
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish"})
#: Fused activations that still take time inside the conv's kernel: measured here at one thread, 0.17-0.21 ns
#: per output element for a Sigmoid or HardSwish after depthwise, 1×1 and 3×3 convs (as much as a 64-channel
#: depthwise conv itself), where a fused Relu or Clip costs nothing.
_COSTLY_EPILOGUES = frozenset({"Sigmoid", "Tanh", "HardSigmoid", "HardSwish"})
#: Activations only the blocked (NCHWc) convs take: after any other kernel onnxruntime runs a HardSwish as
#: HardSigmoid and Mul (the graphs it writes for SVD factors with unaligned channels: 9 of each, unfused).
_BLOCKED_ONLY_ACTIVATIONS = frozenset({"HardSwish"})
_BLOCKED_FLOAT_CLASSES = frozenset({"conv", "pointwise", "depthwise"})
#: Ops onnxruntime removes, rewiring their readers to their input.
_ELIMINATED = frozenset({"Identity", "Dropout"})


def kernel_classes(
    nodes: list[onnx.NodeProto],
    infos: dict[str, TensorInfo],
    constants: Iterable[str],
    runtime: str | None = None,
    graph_outputs: Iterable[str] = (),
    decoded: Iterable[str] = (),
) -> list[str]:
    """The kernel class of each node (in the order given, which must be topological).

    Without a runtime, each node gets the class of its op and weight: ``conv``, ``depthwise``,
    ``unblocked_conv``, ``conv1d``, ``dynamic_weight`` (when its weight input is not a constant), ``int8`` or
    ``other``. With ``runtime="onnxruntime"`` the graph is first rewritten the way onnxruntime's default
    graph optimisations rewrite it, and nodes that then cost nothing per inference are ``folded``
    (computed once from constants when the session is created) or ``fused`` (absorbed into another
    node's kernel):

    * constant folding: a main-graph node whose inputs are all constants (or folded) is ``folded``,
      except DequantizeLinear and random generators;
    * QDQ fusion: a Conv, MatMul or Gemm whose activation and weight come from DequantizeLinear nodes is
      ``int8``; other ops of ``_QDQ_OTHER`` between DequantizeLinear inputs and a single QuantizeLinear
      keep their class; in both cases those DequantizeLinear nodes (when they feed nothing else) and the
      QuantizeLinear are ``fused``;
    * elimination: Identity and Dropout are ``fused`` (their readers read their input);
    * epilogue fusion: after a float Conv whose weight is constant, BatchNormalization and Add/Mul with
      constant operands are ``fused`` (after a MatMul, an Add with a constant operand); then one
      activation (Relu, Clip, Sigmoid, Tanh, LeakyRelu, HardSigmoid; HardSwish only after a conv the
      blocked layout takes) after a Conv, Gemm or MatMul. Each only when the tensor it reads goes nowhere
      else;
    * SiLU: a Sigmoid read only by a Mul of its own input (``x * sigmoid(x)``) is ``fused`` into that
      Mul (onnxruntime's QuickGelu).

    Fusions of longer patterns are not modelled; the layout changes around blocked convs are found apart, on
    these classes (``nnopt.cost.layout``).

    Args:
        nodes: The main-graph nodes in topological order.
        infos: Tensor shapes (for the weight shape of a Conv: depthwise or not).
        constants: Names of constant tensors (initializers, Constant outputs).
        runtime: None, or a key of ``nnopt.cost.hardware.RUNTIMES`` (``"generic"``, ``"onnxruntime"``)
            to model its graph rewrites (``generic``: only constant folding and QDQ fusion).
        graph_outputs: Names of the graph outputs (a fused epilogue would hide them).
        decoded: Names of the weights decoded from constants at run time (``nnopt.cost.decoded``): what the
            ``generic`` runtime folds.
    """
    const = set(constants)
    if runtime is None:
        return [_op_kernel(node, infos, const) for node in nodes]
    graph = _RuntimeGraph(nodes, infos, const, graph_outputs, decoded)
    for rewrite in _REWRITES[runtime]:
        rewrite(graph)
    return graph.classes


class _RuntimeGraph:
    """The main graph as a runtime's optimiser sees it: each node's kernel class so far, who produces and who
    reads each tensor, and the tensors eliminated nodes pass through (``alias``). The rewrites of
    ``_REWRITES`` of the runtime run on it in order, each turning some nodes' classes into ``folded``,
    ``fused`` or ``int8``."""

    def __init__(
        self,
        nodes: list[onnx.NodeProto],
        infos: dict[str, TensorInfo],
        const: set[str],
        graph_outputs: Iterable[str],
        decoded: Iterable[str] = (),
    ) -> None:
        self.nodes, self.infos, self.const, self.decoded = nodes, infos, const, set(decoded)
        self.classes: list[str] = []
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = {name: [-1] for name in graph_outputs}  # -1: read by the caller
        self.alias: dict[str, str] = {}
        for i, node in enumerate(nodes):
            for name in dict.fromkeys(node.input):
                if name:
                    self.readers.setdefault(name, []).append(i)
            for name in node.output:
                if name:
                    self.producer[name] = i
        self.ops = [node.op_type if norm_domain(node.domain) == "" else f"{node.domain}:{node.op_type}"
                    for node in nodes]  # fmt: skip

    def from_dq(self, name: str) -> bool:
        j = self.producer.get(name)
        return j is not None and self.ops[j] == "DequantizeLinear"

    def only_reader(self, name: str) -> int | None:
        found = self.readers.get(name, [])
        return found[0] if len(found) == 1 and found[0] >= 0 else None

    def source(self, name: str) -> str:
        return self.alias.get(name, name)


def _fold_constants(g: _RuntimeGraph) -> None:
    """A node whose inputs are all constants (or folded) is ``folded``; each other node gets its own class,
    decided once its weight is known to be constant or not."""
    for i, node in enumerate(g.nodes):
        foldable = g.ops[i] not in _NOT_FOLDED and ":" not in g.ops[i] and not has_subgraph(node)
        if foldable and all(name in g.const for name in node.input if name):
            g.classes.append("folded")
            g.const.update(name for name in node.output if name)
        else:
            g.classes.append(_op_kernel(node, g.infos, g.const))


def _fold_decoders(g: _RuntimeGraph) -> None:
    """Only the nodes that decode a weight from constants (``decoded``: what ``nnopt.cost.decoded`` found, e.g.
    a kmeans codebook Gather and the index arithmetic before it) are ``folded``; each other node gets its
    own class. Any runtime computes these once at load; other constant subgraphs stay as written."""
    decoding: set[int] = set()
    todo = [g.producer[name] for name in g.decoded if name in g.producer]
    while todo:
        i = todo.pop()
        if i not in decoding:
            decoding.add(i)
            todo.extend(g.producer[name] for name in g.nodes[i].input if name in g.producer)
    folded: set[str] = set()  # outputs of folded nodes: what follows a decoder on constants only folds too
    for i, node in enumerate(g.nodes):
        inputs = [name for name in node.input if name]
        foldable = g.ops[i] not in _NOT_FOLDED and ":" not in g.ops[i] and not has_subgraph(node)
        decodes = i in decoding or any(name in folded for name in inputs)
        if foldable and decodes and all(name in g.const for name in inputs):
            g.classes.append("folded")
            outputs = [name for name in node.output if name]
            g.const.update(outputs)
            folded.update(outputs)
        else:
            g.classes.append(_op_kernel(node, g.infos, g.const))


def _fuse_qdq_groups(g: _RuntimeGraph) -> None:
    """DequantizeLinear → op → QuantizeLinear groups run as one int8 kernel (see ``kernel_classes``)."""
    grouped: set[int] = set()
    for i, node in enumerate(g.nodes):
        if g.classes[i] == "folded" or g.ops[i] not in _QDQ_COMPUTE | _QDQ_OTHER:
            continue
        activations = [name for name in node.input if name and name not in g.const]
        if not activations or not all(g.from_dq(name) for name in activations):
            continue
        after = [g.only_reader(name) for name in node.output if name]
        quantize = [j for j in after if j is not None and g.ops[j] == "QuantizeLinear"]
        quantized = bool(after) and len(quantize) == len(after)
        if g.ops[i] in _QDQ_COMPUTE:
            if len(node.input) < 2 or not g.from_dq(node.input[1]):
                continue
            g.classes[i] = _qdq_kernel(node, g)
        elif not quantized:
            continue
        elif g.ops[i] in _QDQ_KERNEL:
            if len(_dq_types(g, activations)) != 1:
                continue  # QLinearAdd/QLinearMul take one type: uint8 + int8 stays float with its Q/DQ nodes
            g.classes[i] = _QDQ_KERNEL[g.ops[i]]
        grouped.add(i)
        for j in quantize if quantized else []:
            g.classes[j] = "fused"
    for i in grouped:
        for name in g.nodes[i].input:
            if name and g.from_dq(name) and all(k in grouped for k in g.readers.get(name, [])):
                g.classes[g.producer[name]] = "fused"


def _dq_types(g: _RuntimeGraph, names: list[str]) -> set[int | None]:
    """The quantized types the DequantizeLinear nodes producing ``names`` read."""
    types = set()
    for name in names:
        source = g.nodes[g.producer[name]].input[0]
        info = g.infos.get(source)
        types.add(info.dtype if info is not None else None)
    return types


def _qdq_kernel(node: onnx.NodeProto, g: _RuntimeGraph) -> str:
    """The int8 kernel class of a QDQ-wrapped Conv/MatMul/Gemm (its weight is the DequantizeLinear's input)."""
    if node.op_type != "Conv":
        return _QDQ_KERNEL[node.op_type]
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    weight = g.infos.get(g.nodes[g.producer[node.input[1]]].input[0])
    shape = weight.shape if weight is not None else None
    depthwise = group > 1 and shape is not None and len(shape) > 1 and shape[1] == 1
    pointwise = group == 1 and shape is not None and len(shape) > 2 and all(k == 1 for k in shape[2:])
    return "int8_depthwise" if depthwise else "int8_pointwise" if pointwise else "int8"


def _eliminate_pass_throughs(g: _RuntimeGraph) -> None:
    """Identity and Dropout are ``fused``: their readers read their input (recorded in ``alias``)."""
    for i, node in enumerate(g.nodes):
        if g.ops[i] in _ELIMINATED and g.classes[i] != "folded" and node.input and node.input[0] and node.output:
            g.classes[i] = "fused"
            source = g.source(node.input[0])
            g.alias[node.output[0]] = source
            g.readers[source] = [k for k in g.readers.get(source, []) if k != i] + g.readers.get(node.output[0], [])


def _fuse_epilogues(g: _RuntimeGraph) -> None:
    """Affine ops and one activation after a float Conv/Gemm/MatMul, followed while exactly one node reads
    each tensor, are ``fused`` into it."""
    for i, node in enumerate(g.nodes):
        float_kernel = g.classes[i] in ("conv", "pointwise", "depthwise", "grouped_conv", "unblocked_conv",
                                        "conv1d", "unblocked_pointwise", "dynamic_weight")
        if not float_kernel or g.ops[i] not in _EPILOGUE_AFFINE or not node.output:
            continue
        affine = _EPILOGUE_AFFINE[g.ops[i]]
        weight = g.infos.get(node.input[1]) if len(node.input) > 1 else None
        if g.ops[i] == "Conv" and not (weight is not None and weight.name in g.const and weight.shape):
            affine = frozenset()  # folding BatchNormalization/Add/Mul rewrites the weight: it must be constant
        tail = node.output[0]
        while (j := g.only_reader(tail)) is not None:
            follower = g.nodes[j]
            data = g.source(follower.input[0]) if follower.input else ""
            rest = [name for name in follower.input if name and g.source(name) != tail]
            if not all(name in g.const for name in rest) or not follower.output:
                break
            folds = data == tail if g.ops[j] == "BatchNormalization" else _per_channel(g.ops[i], rest, g.infos, weight)
            if g.ops[j] in affine and folds:
                g.classes[j] = "fused"
                tail = follower.output[0]
                continue
            blocked_only = g.ops[j] in _BLOCKED_ONLY_ACTIVATIONS and g.classes[i] not in _BLOCKED_FLOAT_CLASSES
            if g.ops[j] in _FUSED_ACTIVATIONS and data == tail and not blocked_only:
                g.classes[j] = EPILOGUE_KERNEL if g.ops[j] in _COSTLY_EPILOGUES else "fused"
            break


def _fuse_silu(g: _RuntimeGraph) -> None:
    """SiLU, ``x * sigmoid(x)``: the Sigmoid is computed inside the Mul."""
    for i, node in enumerate(g.nodes):
        if g.ops[i] != "Sigmoid" or g.classes[i] != "activation" or not node.input or not node.output:
            continue
        j = g.only_reader(node.output[0])
        if j is not None and g.ops[j] == "Mul" and g.classes[j] == "other":
            operands = {g.source(name) for name in g.nodes[j].input}
            if operands == {g.source(node.input[0]), node.output[0]}:
                g.classes[i] = "fused"
                g.classes[j] = "activation"  # the Mul computes the sigmoid too (onnxruntime's QuickGelu)


#: Per runtime (``nnopt.cost.hardware.RUNTIMES``), its graph rewrites as the estimate models them, in the order
#: they apply. ``generic``: what every deployment runtime does (constant subgraphs such as kmeans decoders
#: computed once at load, QDQ groups run as int8 kernels; other constant subgraphs stay as written);
#: ``onnxruntime``: every constant subgraph folded, and its default fusions.
_REWRITES: dict[str, tuple[Callable[[_RuntimeGraph], None], ...]] = {
    "generic": (_fold_decoders, _fuse_qdq_groups),
    "onnxruntime": (_fold_constants, _fuse_qdq_groups, _eliminate_pass_throughs, _fuse_epilogues, _fuse_silu),
}


def _per_channel(host: str, operands: list[str], infos: dict[str, TensorInfo], weight: TensorInfo | None) -> bool:
    """Whether an Add/Mul's constant operand can fold into the ``host`` before it: after a Conv, one value per
    output channel ([C, 1, 1] or [1, C, 1, 1], what ConvAddFusion/ConvMulFusion require); after a MatMul,
    any constant (a bias, MatMulAddFusion)."""
    if host == "MatMul":
        return True
    info = infos.get(operands[0]) if len(operands) == 1 else None
    if weight is None or weight.shape is None or info is None or info.shape is None:
        return False
    channels, channel_axis_from_end = weight.shape[0], len(weight.shape) - 1
    return (
        math.prod(info.shape) == channels
        and len(info.shape) >= channel_axis_from_end
        and info.shape[-channel_axis_from_end] == channels
    )


def _op_kernel(node: onnx.NodeProto, infos: dict[str, TensorInfo], constants: set[str]) -> str:
    """The kernel class of ``node`` from its op and its weight (see ``_KERNEL_OF_OP``)."""
    kernel, weight_index = _KERNEL_OF_OP.get((norm_domain(node.domain), node.op_type), ("other", None))
    if weight_index is not None and len(node.input) > weight_index:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.input[weight_index] not in constants:
            # A grouped conv whose weight is computed at run time takes the generic path, a GEMM per group
            # (weight-only MobileNetV3: its depthwise convs ran 10-20 × slower than the dense rate says).
            return "grouped_conv" if group > 1 else "dynamic_weight"
        weight = infos.get(node.input[weight_index])
        if weight is None or weight.shape is None or len(weight.shape) < 2:
            return kernel
        if group > 1:
            # Only a plain depthwise conv (one input and one output channel per group) has onnxruntime's
            # depthwise kernel; a channel multiplier or several channels per group take the generic path.
            plain = weight.shape[1] == 1 and (weight.shape[0] == group or node.op_type == "ConvTranspose")
            return "depthwise" if plain else "grouped_conv"
        channels = weight.shape[1]
        blockable = (norm_domain(node.domain), node.op_type) in _BLOCKABLE_OPS
        unaligned = channels >= _BLOCKED_MIN_CHANNELS and channels % _BLOCKED_ALIGNMENT
        if blockable and group == 1 and len(weight.shape) > 2 and all(k == 1 for k in weight.shape[2:]):
            # One GEMM at the pointwise rate either way; unaligned, outside the blocked layout (SVD's second
            # factors of rank 30-177 ran as plain Convs, with reorders around them).
            return "unblocked_pointwise" if unaligned else "pointwise"
        if blockable and group == 1 and len(weight.shape) == _BLOCKED_RANK - 1 and node.op_type != "ConvTranspose":
            # Outside the NCHWc layout too, but one small im2col and GEMM: Silero VAD's 1-D convs over 1-4
            # steps took 1-9 µs, where the 2-D unblocked probe's fixed cost alone is 3.5 µs.
            return "conv1d"
        if blockable and group == 1 and unaligned:
            return "unblocked_conv"
        if blockable and group == 1 and len(weight.shape) != _BLOCKED_RANK:
            return "unblocked_conv"  # 3-D convs (and 1-D ConvTranspose): the NCHWc layout takes 2-D convs only
    return kernel

