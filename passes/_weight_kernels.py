"""Weight-only int8 that onnxruntime runs without dequantizing at every run: its dynamic int8 and MatMulNBits kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper

from nnopt.pipeline.base import LayerDecision

# NOTE: why. ``quantize:mode=weight_only`` stores int8 weights behind DequantizeLinear; onnxruntime does not
# constant-fold a DequantizeLinear (it keeps QDQ groups for its fusions), so the weights are dequantized at
# every run and the model runs 1.3-2.7x slower than float. For MatMul, Gemm and LSTM onnxruntime has kernels
# that take int8 weights as they are: its dynamic quantizer's MatMulInteger (fused at load into
# DynamicQuantizeMatMul: activations quantized per run, int8 GEMM) and DynamicQuantizeLSTM, and its
# MatMulNBits (blockwise 4/8-bit weights, int8 compute with accuracy_level 4). The rewrites are onnxruntime's
# own tools (``ONNXQuantizer`` in IntegerOps mode, ``MatMulNBitsQuantizer``), run on the selected nodes only.
# Conv has ConvInteger, measured 1.9-5.8x float: never a fast kernel here.

#: Block size of MatMulNBits weights (onnxruntime's 32 keeps the 4-bit error small; 8-bit barely changes).
NBITS_BLOCK = 32
#: MatMulNBits compute: 4 = int8 activations (onnxruntime's fast CPU path; 0 dequantizes to float per block).
NBITS_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class FastKernel:
    """One of onnxruntime's weight-quantized kernels: the op types it takes and what onnxruntime runs for each."""

    name: str
    runs_as: dict[str, str]
    apply: Callable[[onnx.ModelProto, list[str], bool, int], onnx.ModelProto]


def _eligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """Why ``node`` cannot take a fast kernel, or None when it can (its weights are float initializers of
    the shapes the kernels take)."""
    floats = (onnx.TensorProto.FLOAT,)

    def weight(index: int, rank: int) -> bool:
        t = inits.get(node.input[index]) if len(node.input) > index else None
        return t is not None and t.data_type in floats and len(t.dims) == rank

    if node.op_type == "MatMul":
        return None if weight(1, 2) else "its B is not a 2-D float32 initializer"
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            return "alpha/beta != 1 or transA: onnxruntime's MatMul rewrite of Gemm does not apply"
        return None if weight(1, 2) else "its B is not a 2-D float32 initializer"
    if node.op_type == "LSTM":
        return None if weight(1, 3) and weight(2, 3) else "W and R are not float32 initializers"
    return f"onnxruntime has no weight-quantized kernel for {node.op_type} that is faster than float"


def _dynamic(proto: onnx.ModelProto, names: list[str], per_channel: bool, nbits: int) -> onnx.ModelProto:
    """onnxruntime's ``quantize_dynamic`` (IntegerOps, int8 weights, per channel) of the named nodes, in memory.

    Its quantizer first rewrites every Gemm (alpha = beta = 1, no transA) as MatMul (+ Add), naming the
    MatMul ``<gemm>_MatMul``: a selected Gemm is named so. Unselected Gemms become float MatMul + Add,
    which onnxruntime fuses back into a Gemm at load.
    """
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType

    gemms = {n.name for n in proto.graph.node if n.op_type == "Gemm"}
    wanted = [f"{n}_MatMul" if n in gemms else n for n in names]
    inferred = onnx.shape_inference.infer_shapes(proto)
    quantizer = ONNXQuantizer(inferred, per_channel, False, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                              QuantType.QUInt8, None, wanted, [], ["MatMul", "LSTM"], {"MatMulConstBOnly": True})
    quantizer.quantize_model()
    return quantizer.model.model


def _matmul_nbits(proto: onnx.ModelProto, names: list[str], per_channel: bool, nbits: int) -> onnx.ModelProto:
    """onnxruntime's ``MatMulNBitsQuantizer`` (symmetric, ``NBITS_BLOCK`` blocks) of the named MatMul/Gemm nodes.

    Gemms are first rewritten as MatMul (+ Add) by onnxruntime's ``ONNXModel.replace_gemm_with_matmul``
    (its quantizer takes MatMul only). Needs the ``onnx-ir`` package (onnxruntime imports it there).
    """
    from onnxruntime.quantization.onnx_model import ONNXModel

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # onnxruntime's module imports onnx_ir, which onnxruntime does not depend on
        raise RuntimeError(f"kernel=matmul_nbits needs onnxruntime's MatMulNBitsQuantizer: {exc} "
                           "(pip install onnx-ir)") from exc
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    gemms = {n.name for n in work.graph.node if n.op_type == "Gemm"}
    wanted = {f"{n}_MatMul" if n in gemms else n for n in names}
    model = ONNXModel(work)
    model.replace_gemm_with_matmul()
    others = [n.name for n in model.model.graph.node if n.op_type == "MatMul" and n.name not in wanted]
    quantizer = MatMulNBitsQuantizer(model.model, bits=nbits, block_size=NBITS_BLOCK, is_symmetric=True,
                                     accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=others,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


#: The fast kernels by option value.
FAST_KERNELS: dict[str, FastKernel] = {
    "dynamic": FastKernel("dynamic", {"MatMul": "DynamicQuantizeMatMul", "Gemm": "DynamicQuantizeMatMul",
                                      "LSTM": "DynamicQuantizeLSTM"}, _dynamic),
    "matmul_nbits": FastKernel("matmul_nbits", {"MatMul": "MatMulNBits", "Gemm": "MatMulNBits"}, _matmul_nbits),
}
#: kernel=auto: per op type, the fast kernel that measured fastest (docs/quantize_vs_ort.md: dynamic int8
#: 0.52x float on ddddocr's CRNN where MatMulNBits gave 0.77x); other layers are dequantized as before.
AUTO: dict[str, str] = {"MatMul": "dynamic", "Gemm": "dynamic", "LSTM": "dynamic"}

Dequantize = Callable[[onnx.ModelProto, list[onnx.NodeProto], bool], tuple[onnx.ModelProto, list[LayerDecision]]]


def _plan(selected: Sequence[onnx.NodeProto], inits: dict[str, onnx.TensorProto], kernel: str,
          ) -> tuple[dict[str, str], dict[str, str]]:
    """(node name -> fast kernel, node name -> why it gets none) for the selected nodes."""
    plan: dict[str, str] = {}
    none: dict[str, str] = {}
    for node in selected:
        choice = AUTO.get(node.op_type) if kernel == "auto" else kernel
        if choice is None or node.op_type not in FAST_KERNELS[choice].runs_as:
            none[node.name] = f"no {kernel if kernel != 'auto' else 'fast'} kernel for {node.op_type}"
            continue
        why = _eligible(node, inits)
        if why is None:
            plan[node.name] = choice
        else:
            none[node.name] = why
    return plan, none


def weight_only_fast(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto], per_channel: bool, kernel: str,
                     nbits: int, dequantize: Dequantize) -> tuple[onnx.ModelProto, list[LayerDecision]]:
    """Weight-only int8 with onnxruntime's fast kernels: (model, per-layer decisions).

    ``kernel`` ``dynamic`` or ``matmul_nbits``: the nodes that kernel takes get it, the others stay float
    (a latency-safe choice); ``auto``: each node gets ``AUTO``'s kernel for its op type where it applies,
    the others are stored int8 + DequantizeLinear by ``dequantize`` (every weight int8, as with
    ``kernel=dequantize``). Each layer's figures say which kernel it got (``kernel``, ``runs_as``) or why none.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    plan, none = _plan(selected, inits, kernel)
    out = proto
    for name in sorted(set(plan.values())):  # each kernel once, over its nodes
        out = FAST_KERNELS[name].apply(out, [n for n, k in plan.items() if k == name], per_channel, nbits)
    left = {n.name: n.op_type for n in out.graph.node}
    layers: list[LayerDecision] = []
    for node in selected:
        chosen = plan.get(node.name)
        # The quantizer replaces a node it quantizes; one still there with its op type was declined by it.
        if chosen is not None and left.get(node.name) != node.op_type and left.get(f"{node.name}_MatMul") != "MatMul":
            layers.append(LayerDecision(node.name, node.op_type, "rewritten", figures={
                "kernel": chosen, "runs_as": FAST_KERNELS[chosen].runs_as[node.op_type]}))
        elif chosen is not None:
            none[node.name] = f"onnxruntime's {chosen} quantizer left it alone"
    # A Gemm the dynamic quantizer rewrote as MatMul (+ Add) without quantizing it is found under its new name.
    renamed = {f"{name}_MatMul": name for name in none if name not in left}
    rest = [n for n in out.graph.node if n.name in none or n.name in renamed]
    if kernel == "auto" and rest:
        out, dq_layers = dequantize(out, rest, per_channel)
        for entry in dq_layers:
            if entry.action == "rewritten":
                why = none[renamed.get(entry.node, entry.node)]
                entry.figures.update({"kernel": "dequantize", "runs_as": f"DequantizeLinear + {entry.op_type}",
                                      "why": why})
        layers.extend(dq_layers)
    else:
        layers.extend(LayerDecision(n.name, n.op_type, "declined", f"{none[n.name]}: stays float")
                      for n in selected if n.name in none)
    return out, layers


def strip_extras(out: onnx.ModelProto, before: onnx.ModelProto) -> None:
    """Drop the value_info onnxruntime's quantizers inferred (not part of the result), in place."""
    keep = {v.name for v in before.graph.value_info}
    kept = [v for v in out.graph.value_info if v.name in keep]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)


def kernel_counts(layers: Sequence[LayerDecision]) -> dict[str, Any]:
    """Layers per kernel among the rewritten ones (for the pass's stats)."""
    counts: dict[str, int] = {}
    for entry in layers:
        kernel = entry.figures.get("kernel")
        if entry.action == "rewritten" and isinstance(kernel, str):
            counts[kernel] = counts.get(kernel, 0) + 1
    return dict(sorted(counts.items()))
