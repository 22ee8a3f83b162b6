"""The layout changes onnxruntime adds around its blocked (NCHWc) convs: ReorderInput and ReorderOutput nodes.

onnxruntime's NCHWc transformer runs 2-D float convs in a channel-blocked layout and keeps a tensor in it as
long as the ops reading it can take it (other blocked convs, pools, Add/Sum of two blocked tensors of one
shape, channel Concat, Relu/Sigmoid/Tanh, BatchNormalization, Resize). Where a blocked tensor meets any other
op (the Add/Clip/Mul/Div of a decomposed HardSwish, the Mul of a squeeze-excitation block, a Reshape) it
inserts a ReorderOutput back to NCHW, and before a blocked conv reading an NCHW tensor a ReorderInput. Each
is a node that copies the whole tensor: on MobileNetV3-style models (ppocr's) a quarter of the executed
nodes. ``reorders`` finds them on the graph as written, with the kernel classes the runtime rewrites gave.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx

from nnopt.cost.hardware import FUSED_KERNELS
from nnopt.cost.tensors import TensorInfo, norm_domain

#: The kernel classes of convs onnxruntime runs blocked (``nnopt.cost.runtime_kernels``: dense convs with a
#: blockable channel count, 1×1 convs and plain depthwise convs).
_BLOCKED_CLASSES = frozenset({"conv", "pointwise", "depthwise"})
#: A depthwise conv is blocked when its channels are a multiple of this (padded up to the block: checked with
#: onnxruntime 1.32 on 4, 8, 12, 20 and 24 channels, AVX-512).
_DEPTHWISE_ALIGNMENT = 4
#: Ops that read a blocked tensor and write a blocked one (onnxruntime's NchwcTransformer). ``_SAME_SHAPE``
#: ones only when every activation input is blocked and of one shape.
_PROPAGATE = frozenset({"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Relu", "Sigmoid", "Tanh",
                        "BatchNormalization", "Resize", "Upsample", "Concat"})  # fmt: skip
_SAME_SHAPE = frozenset({"Add", "Sum", "Mul"})


@dataclass(frozen=True)
class Reorder:
    """One layout change: ``tensor`` copied to (``to_blocked``) or from the blocked layout, charged to the
    node at index ``node`` (the blocked conv reading it, or the node writing it)."""

    node: int
    tensor: str
    to_blocked: bool


def reorders(
    nodes: Sequence[onnx.NodeProto],
    classes: Sequence[str],
    infos: dict[str, TensorInfo],
    block: int,
    graph_outputs: Iterable[str] = (),
) -> list[Reorder]:
    """The ReorderInput/ReorderOutput nodes onnxruntime adds to ``nodes`` (topological order) whose kernel
    classes are ``classes`` (from ``kernel_classes`` with ``runtime="onnxruntime"``: ``folded`` and ``fused``
    nodes are transparent: a fused activation's output is in its input's layout).

    One ReorderOutput per blocked tensor that some other op (or the graph's caller) reads, and one
    ReorderInput per NCHW tensor that a blocked conv with at least ``block`` input channels reads (``block``:
    the channel block, ``HardwareProfile.nchwc_block``: a dense conv with fewer input channels reads NCHW
    directly).
    """
    blocked: set[str] = set()
    producer: dict[str, int] = {}
    readers: dict[str, list[int]] = {name: [-1] for name in graph_outputs}
    found: list[Reorder] = []
    to_blocked: set[str] = set()
    for i, node in enumerate(nodes):
        data = [name for name in node.input if name]
        if classes[i] == "folded":
            continue
        for name in dict.fromkeys(data):
            readers.setdefault(name, []).append(i)
        out = [name for name in node.output if name]
        for name in out:
            producer[name] = i
        if classes[i] in FUSED_KERNELS:
            if data and data[0] in blocked:
                blocked.update(out[:1])
                producer.update(dict.fromkeys(out, producer[data[0]]))  # charged to the kernel it is fused into
            continue
        if _is_blocked_conv(node, classes[i], infos, block):
            if data[0] not in blocked and _channels(infos.get(data[0])) >= block and data[0] not in to_blocked:
                to_blocked.add(data[0])
                found.append(Reorder(i, data[0], True))
            blocked.update(out[:1])
        elif _propagates(node, data, blocked, infos, block):
            blocked.update(out[:1])
    for name in sorted(blocked, key=lambda n: producer[n]):
        if any(j < 0 or not _reads_blocked(nodes[j], classes[j], name, blocked, infos, block) for j in readers.get(name, [])):
            found.append(Reorder(producer[name], name, False))
    return found


def _is_blocked_conv(node: onnx.NodeProto, kernel: str, infos: dict[str, TensorInfo], block: int) -> bool:
    """A float 2-D Conv onnxruntime runs blocked (a depthwise one only with channels a multiple of 4)."""
    if kernel not in _BLOCKED_CLASSES or (norm_domain(node.domain), node.op_type) != ("", "Conv"):
        return False
    weight = infos.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.shape is None or len(weight.shape) != 4:
        return False
    return kernel != "depthwise" or weight.shape[0] % _DEPTHWISE_ALIGNMENT == 0


def _propagates(
    node: onnx.NodeProto, data: list[str], blocked: set[str], infos: dict[str, TensorInfo], block: int
) -> bool:
    if norm_domain(node.domain) != "" or not data or data[0] not in blocked:
        return False
    if node.op_type in _SAME_SHAPE:
        shapes = {_shape(infos.get(name)) for name in data}
        return all(name in blocked for name in data) and len(shapes) == 1 and None not in shapes
    if node.op_type == "Concat":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return axis == 1 and all(name in blocked and _channels(infos.get(name)) % block == 0 for name in data)
    return node.op_type in _PROPAGATE and node.op_type not in ("Resize", "Upsample") or _nearest(node)


def _nearest(node: onnx.NodeProto) -> bool:
    """A Resize/Upsample in nearest mode (the one the NCHWc transformer takes)."""
    if node.op_type not in ("Resize", "Upsample"):
        return False
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode == b"nearest"


def _reads_blocked(
    node: onnx.NodeProto, kernel: str, name: str, blocked: set[str], infos: dict[str, TensorInfo], block: int
) -> bool:
    """Whether ``node`` takes the blocked tensor ``name`` as it is."""
    if kernel in FUSED_KERNELS:
        return True  # absorbed into the kernel that produced ``name``
    data = [n for n in node.input if n]
    if _is_blocked_conv(node, kernel, infos, block):
        # A conv with fewer input channels than a block reads NCHW (SVD's first factor of rank 5 or 15, padded
        # to 16 blocked channels, was reordered out before its second factor: 18-26 µs on 112 × 112).
        return data[0] == name and _channels(infos.get(name)) >= block
    return _propagates(node, data, blocked, infos, block)


def padded_work(node: onnx.NodeProto, kernel: str, infos: dict[str, TensorInfo], block: int) -> float:
    """How much more work a conv onnxruntime runs blocked does than the graph as written says: its output
    channels padded up to a whole block, and its input channels too when they are a block or more (a conv
    with fewer reads NCHW). 1.0 for every other node. Seen in onnxruntime's optimized graphs: SVD factors of
    rank 5, 15 and 28 ran with weights of 16, 16 and 32 output channels, and took the time of that many."""
    if block <= 0 or not _is_blocked_conv(node, kernel, infos, block):
        return 1.0
    weight = infos[node.input[1]]
    assert weight.shape is not None  # _is_blocked_conv checked it
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    if kernel == "depthwise":  # one input channel per output channel: the work grows with the channels once
        return channel_padding(out_channels, 1, block)
    return channel_padding(out_channels, in_channels, block)


#: Columns of onnxruntime's float GEMM kernel (MLAS packs the right-hand matrix in strips this wide): a 1-D conv's
#: GEMM has one column per output step, so over 1-16 steps it takes as long as over 16. Measured here (AVX-512):
#: 1-D convs over 2, 4, 16 and 128 steps ran at 23-218 GFLOP/s as written, 219-275 per FLOP of steps padded to
#: 16. Not checked on AVX2 machines.
GEMM_COLUMNS = 16


def step_padding(steps: int) -> float:
    """Work of a 1-D conv's GEMM over ``steps`` output steps padded up to whole ``GEMM_COLUMNS`` strips, over its
    work as written."""
    return _round_up(steps, GEMM_COLUMNS) / steps if steps > 0 else 1.0


def channel_padding(out_channels: int, in_channels: int, block: int) -> float:
    """Work of a blocked conv on ``out_channels`` padded up to whole blocks, and ``in_channels`` too when they
    are a block or more (fewer are read unblocked), over its work as written."""
    if block <= 0 or out_channels <= 0 or in_channels <= 0:
        return 1.0
    factor = _round_up(out_channels, block) / out_channels
    return factor * (_round_up(in_channels, block) / in_channels if in_channels >= block else 1.0)


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


def _shape(info: TensorInfo | None) -> tuple[int, ...] | None:
    return tuple(info.shape) if info is not None and info.shape is not None else None


def _channels(info: TensorInfo | None) -> int:
    shape = _shape(info)
    return shape[1] if shape is not None and len(shape) > 1 else 0
