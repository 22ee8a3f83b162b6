"""ONNX operators as PyTorch functions: the registry the distill pass's graph interpreter runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: What an op function gets: its inputs (None for an omitted optional input), its attributes and the
#: model's default-domain opset; it returns its outputs in order.
Inputs = Sequence[torch.Tensor | None]
OpFunction = Callable[[Inputs, dict[str, Any], int], list[torch.Tensor]]


class UnsupportedOp(Exception):
    """The interpreter cannot run this node (its op, or an attribute value it does not implement)."""


@dataclass(frozen=True)
class OpSpec:
    """One operator: how it runs, and which of its inputs are weights distill may train when constant."""

    run: OpFunction
    weight_slots: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------------- helpers
def _x(inputs: Inputs, i: int) -> torch.Tensor:
    value = inputs[i] if i < len(inputs) else None
    if value is None:
        raise UnsupportedOp(f"input {i} is missing")
    return value


def _opt(inputs: Inputs, i: int) -> torch.Tensor | None:
    return inputs[i] if i < len(inputs) else None


def _ints(value: torch.Tensor) -> list[int]:
    return [int(v) for v in value.reshape(-1).tolist()]


def _one(fn: Callable[[Inputs, dict[str, Any], int], torch.Tensor]) -> OpFunction:
    """An op function from one that returns a single output."""
    return lambda inputs, attrs, opset: [fn(inputs, attrs, opset)]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFunction:
    return lambda inputs, attrs, opset: [fn(_x(inputs, 0))]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFunction:
    return lambda inputs, attrs, opset: [fn(_x(inputs, 0), _x(inputs, 1))]


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX integer Div truncates toward zero; torch's `/` would give floats.
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _padding(attrs: dict[str, Any], x: torch.Tensor, kernel: Sequence[int]) -> tuple[list[int], int]:
    """(F.pad amounts, last dim first; the symmetric padding the torch op itself can take)."""
    spatial = x.shape[2:]
    rank = len(spatial)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begins, ends = [0] * rank, [0] * rank
    else:
        pads = list(attrs.get("pads", [0] * 2 * rank))
        begins, ends = pads[:rank], pads[rank:]
    flat: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        flat += [int(b), int(e)]
    return flat, rank


# ---------------------------------------------------------------------------------------------- layers
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x, w, b = _x(inputs, 0), _x(inputs, 1), _opt(inputs, 2)
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    pad, rank = _padding(attrs, x, kernel)
    if rank not in _CONV:
        raise UnsupportedOp(f"{rank}-D Conv")
    x = F.pad(x, pad) if any(pad) else x
    return _CONV[rank](x, w, b, list(attrs.get("strides", [1] * rank)), 0,
                       list(attrs.get("dilations", [1] * rank)), int(attrs.get("group", 1)))


def _conv_transpose(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x, w, b = _x(inputs, 0), _x(inputs, 1), _opt(inputs, 2)
    rank = x.dim() - 2
    if rank not in _CONV_T or "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise UnsupportedOp("ConvTranspose with output_shape, auto_pad or more than 3 spatial dims")
    pads = list(attrs.get("pads", [0] * 2 * rank))
    if pads[:rank] != pads[rank:]:
        raise UnsupportedOp("ConvTranspose with asymmetric pads")
    return _CONV_T[rank](x, w, b, list(attrs.get("strides", [1] * rank)), pads[:rank],
                         list(attrs.get("output_padding", [0] * rank)), int(attrs.get("group", 1)),
                         list(attrs.get("dilations", [1] * rank)))


def _batch_norm(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    if int(attrs.get("training_mode", 0)):
        raise UnsupportedOp("BatchNormalization in training mode")
    x, scale, bias, mean, var = (_x(inputs, i) for i in range(5))
    # Inference form: the running statistics stay fixed while scale and bias train.
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))


def _gemm(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    a, b, c = _x(inputs, 0), _x(inputs, 1), _opt(inputs, 2)
    a = a.t() if int(attrs.get("transA", 0)) else a
    b = b.t() if int(attrs.get("transB", 0)) else b
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    return y if c is None else y + float(attrs.get("beta", 1.0)) * c


def _pool_args(attrs: dict[str, Any], x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(attrs["kernel_shape"])
    pad, rank = _padding(attrs, x, kernel)
    strides = list(attrs.get("strides", [1] * rank))
    return kernel, pad, strides, list(attrs.get("dilations", [1] * rank))


def _max_pool(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    kernel, pad, strides, dilations = _pool_args(attrs, x)
    if x.dim() != 4:
        raise UnsupportedOp("MaxPool on other than 2 spatial dims")
    x = F.pad(x, pad, value=-math.inf) if any(pad) else x
    return F.max_pool2d(x, kernel, strides, 0, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))


def _average_pool(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    kernel, pad, strides, _ = _pool_args(attrs, x)
    if x.dim() != 4 or int(attrs.get("ceil_mode", 0)):
        raise UnsupportedOp("AveragePool on other than 2 spatial dims or with ceil_mode")
    if not any(pad):
        return F.avg_pool2d(x, kernel, strides)
    if int(attrs.get("count_include_pad", 0)):
        return F.avg_pool2d(F.pad(x, pad), kernel, strides)
    # Padding excluded from the count: average the padded sum by the padded count of real elements.
    ones = torch.ones_like(x[:1, :1])
    total = F.avg_pool2d(F.pad(x, pad), kernel, strides)
    return total / F.avg_pool2d(F.pad(ones, pad), kernel, strides)


def _global_pool(reduce: Callable[..., torch.Tensor]) -> OpFunction:
    return lambda inputs, attrs, opset: [reduce(_x(inputs, 0), dim=tuple(range(2, _x(inputs, 0).dim())), keepdim=True)]


def _global_max(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


# ---------------------------------------------------------------------------------------------- activations
def _hard_sigmoid(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return torch.clamp(alpha * _x(inputs, 0) + beta, 0.0, 1.0)


def _hard_swish(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


def _clip(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    if opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        lo_t, hi_t = _opt(inputs, 1), _opt(inputs, 2)
        low = None if lo_t is None else float(lo_t)
        high = None if hi_t is None else float(hi_t)
    return x if low is None and high is None else torch.clamp(x, low, high)


def _softmax_like(fn: Callable[..., torch.Tensor]) -> OpFunction:
    def run(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[torch.Tensor]:
        x = _x(inputs, 0)
        if opset >= 13:
            return [fn(x, dim=int(attrs.get("axis", -1)))]
        # Before opset 13 the op flattens to 2-D at `axis` and normalises each row.
        axis = int(attrs.get("axis", 1)) % max(x.dim(), 1)
        rows = x.reshape(math.prod(x.shape[:axis]), -1)
        return [fn(rows, dim=1).reshape(x.shape)]

    return run


def _leaky_relu(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return F.leaky_relu(_x(inputs, 0), float(attrs.get("alpha", 0.01)))


def _gelu(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    approximate = attrs.get("approximate", "none")
    return F.gelu(_x(inputs, 0), approximate=approximate.decode() if isinstance(approximate, bytes) else approximate)


# ---------------------------------------------------------------------------------------------- shapes
def _axes(inputs: Inputs, attrs: dict[str, Any], opset: int, since: int) -> list[int] | None:
    """Axes from the attribute (before opset ``since``) or the second input (from it on); None: not given."""
    if opset < since:
        return list(attrs["axes"]) if "axes" in attrs else None
    given = _opt(inputs, 1)
    return None if given is None else _ints(given)


def _reshape(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x, shape = _x(inputs, 0), _ints(_x(inputs, 1))
    if not int(attrs.get("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    axis = int(attrs.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _transpose(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    perm = list(attrs.get("perm", reversed(range(x.dim()))))
    return x.permute(perm)


def _squeeze(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    axes = _axes(inputs, attrs, opset, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    axes = _axes(inputs, attrs, opset, 13) or []
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _concat(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    parts = [t for t in inputs if t is not None]
    return torch.cat(parts, dim=int(attrs["axis"]))


def _shape(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    dims = list(_x(inputs, 0).shape)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64)


def _slice(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    if opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(_x(inputs, 1)), _ints(_x(inputs, 2))
        axes_t, steps_t = _opt(inputs, 3), _opt(inputs, 4)
        axes = list(range(len(starts))) if axes_t is None else _ints(axes_t)
        steps = [1] * len(starts) if steps_t is None else _ints(steps_t)
    index: list[slice] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise UnsupportedOp("Slice with a negative step")
        size = x.shape[axis % x.dim()]
        index[axis % x.dim()] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return x[tuple(index)]


def _gather(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x, idx = _x(inputs, 0), _x(inputs, 1)
    axis = int(attrs.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    flat = torch.index_select(x, axis, idx.reshape(-1))
    return flat.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _bit_shift(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x, amount = _x(inputs, 0), _x(inputs, 1)
    direction = attrs["direction"]
    direction = direction.decode() if isinstance(direction, bytes) else direction
    # On unsigned tensors of the same dtype, as ONNX requires: bits shifted out are dropped.
    if direction == "LEFT":
        return torch.bitwise_left_shift(x, amount.to(x.dtype))
    return torch.bitwise_right_shift(x, amount.to(x.dtype))


def _range(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    start, limit, delta = _x(inputs, 0), _x(inputs, 1), _x(inputs, 2)
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _mod(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    # fmod=0 takes the divisor's sign (Python's %, torch.remainder); fmod=1 the dividend's (C's fmod).
    op = torch.fmod if int(attrs.get("fmod", 0)) else torch.remainder
    return op(_x(inputs, 0), _x(inputs, 1))


def scale_shape(x: torch.Tensor, scale: torch.Tensor, attrs: dict[str, Any]) -> list[int]:
    """The shape a (per-tensor or per-axis) scale or zero point broadcasts to against ``x``."""
    if int(attrs.get("block_size", 0)):
        raise UnsupportedOp("blocked QuantizeLinear/DequantizeLinear")
    shape = [1] * x.dim()
    if scale.dim() == 1 and x.dim() > 0 and scale.numel() > 1:
        shape[int(attrs.get("axis", 1)) % x.dim()] = -1
    return shape


def _dequantize_linear(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    # ``x`` may be a float tensor of integer values: QuantizeLinear's fake-quantized output (see below).
    x, scale, zero = _x(inputs, 0), _x(inputs, 1), _opt(inputs, 2)
    shape = scale_shape(x, scale, attrs)
    values = x.to(torch.float32) - (0 if zero is None else zero.to(torch.float32).reshape(shape))
    return values * scale.reshape(shape)


def integer_range(zero: torch.Tensor | None) -> tuple[int, int]:
    """The saturation range of a QuantizeLinear whose zero point is ``zero`` (absent: uint8, as ONNX says)."""
    if zero is None:
        return 0, 255
    if zero.is_floating_point():
        raise UnsupportedOp(f"QuantizeLinear to {zero.dtype}")
    info = torch.iinfo(zero.dtype)
    return info.min, info.max


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, shape: list[int],
                  low: int, high: int) -> torch.Tensor:
    """``saturate(round(x / scale) + zero)`` as a float tensor of integer values, with the straight-through
    estimator: the forward pass rounds (half to even, as ONNX), the gradient passes rounding unchanged and
    is zero where the value saturates (clamp's own gradient), so fixed scales train the values they quantize."""
    q = x / scale.reshape(shape) + (0 if zero is None else zero.to(torch.float32).reshape(shape))
    q = q + (torch.round(q) - q).detach()
    return torch.clamp(q, float(low), float(high))


def _quantize_linear(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    # Fake quantization: the integers stay in a float tensor so that gradients reach the layers before it
    # (DequantizeLinear reads them back; the scales and zero points are constants and stay fixed).
    x, scale, zero = _x(inputs, 0), _x(inputs, 1), _opt(inputs, 2)
    if int(attrs.get("output_dtype", 0)) not in (0, 2, 3):  # 0: the zero point's type
        raise UnsupportedOp("QuantizeLinear to other than uint8/int8")
    low, high = integer_range(zero)
    return fake_quantize(x.to(torch.float32), scale, zero, scale_shape(x, scale, attrs), low, high)


#: ONNX TensorProto data type → the torch dtype the interpreter computes in. Every float type computes
#: in float32: the pass trains float32 copies and casts back to each initializer's own dtype.
_DTYPES = {1: torch.float32, 10: torch.float32, 11: torch.float32, 16: torch.float32, 2: torch.uint8,
           3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64, 9: torch.bool}


def _cast(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    to = int(attrs["to"])
    if to not in _DTYPES:
        raise UnsupportedOp(f"Cast to ONNX data type {to}")
    return _x(inputs, 0).to(_DTYPES[to])


def _reduce_mean(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    x = _x(inputs, 0)
    axes = _axes(inputs, attrs, opset, 18)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if int(attrs.get("noop_with_empty_axes", 0)):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=keep)


def _dropout(inputs: Inputs, attrs: dict[str, Any], opset: int) -> list[torch.Tensor]:
    x = _x(inputs, 0)
    return [x, torch.ones_like(x, dtype=torch.bool)]  # inference: the identity, and an all-true mask


def _identity(inputs: Inputs, attrs: dict[str, Any], opset: int) -> torch.Tensor:
    return _x(inputs, 0)


#: ONNX op type (default domain) → how the interpreter runs it.
OPS: dict[str, OpSpec] = {
    "Conv": OpSpec(_one(_conv), (1, 2)),
    "ConvTranspose": OpSpec(_one(_conv_transpose), (1, 2)),
    "BatchNormalization": OpSpec(_one(_batch_norm), (1, 2)),
    "Gemm": OpSpec(_one(_gemm), (1, 2)),
    "MatMul": OpSpec(_binary(torch.matmul), (0, 1)),
    "MaxPool": OpSpec(_one(_max_pool)),
    "AveragePool": OpSpec(_one(_average_pool)),
    "GlobalAveragePool": OpSpec(_global_pool(torch.mean)),
    "GlobalMaxPool": OpSpec(_global_pool(_global_max)),
    "Relu": OpSpec(_unary(torch.relu)),
    "LeakyRelu": OpSpec(_one(_leaky_relu)),
    "Sigmoid": OpSpec(_unary(torch.sigmoid)),
    "Tanh": OpSpec(_unary(torch.tanh)),
    "HardSigmoid": OpSpec(_one(_hard_sigmoid)),
    "HardSwish": OpSpec(_one(_hard_swish)),
    "Clip": OpSpec(_one(_clip)),
    "Gelu": OpSpec(_one(_gelu)),
    "Erf": OpSpec(_unary(torch.erf)),
    "Exp": OpSpec(_unary(torch.exp)),
    "Log": OpSpec(_unary(torch.log)),
    "Sqrt": OpSpec(_unary(torch.sqrt)),
    "Neg": OpSpec(_unary(torch.neg)),
    "Abs": OpSpec(_unary(torch.abs)),
    "Softmax": OpSpec(_softmax_like(torch.softmax)),
    "LogSoftmax": OpSpec(_softmax_like(torch.log_softmax)),
    "Add": OpSpec(_binary(torch.add)),
    "Sub": OpSpec(_binary(torch.sub)),
    "Mul": OpSpec(_binary(torch.mul)),
    "Div": OpSpec(_binary(_div)),
    "Pow": OpSpec(_binary(torch.pow)),
    "Reshape": OpSpec(_one(_reshape)),
    "Flatten": OpSpec(_one(_flatten)),
    "Transpose": OpSpec(_one(_transpose)),
    "Squeeze": OpSpec(_one(_squeeze)),
    "Unsqueeze": OpSpec(_one(_unsqueeze)),
    "Concat": OpSpec(_one(_concat)),
    "Shape": OpSpec(_one(_shape)),
    "Slice": OpSpec(_one(_slice)),
    # A float table read by Gather is a weight: an embedding, or a kmeans codebook (its centroids then
    # train the way Deep Compression fine-tunes shared weights, indices kept).
    "Gather": OpSpec(_one(_gather), (0,)),
    "BitShift": OpSpec(_one(_bit_shift)),
    # hashed-sharing's decoder: positions and their hash (its values train through the Gather above).
    "Range": OpSpec(_one(_range)),
    "Mod": OpSpec(_one(_mod)),
    "DequantizeLinear": OpSpec(_one(_dequantize_linear)),
    # Static quantize's activations: fake-quantized with a straight-through gradient (quantization-aware training).
    "QuantizeLinear": OpSpec(_one(_quantize_linear)),
    "Cast": OpSpec(_one(_cast)),
    "ReduceMean": OpSpec(_one(_reduce_mean)),
    "Dropout": OpSpec(_dropout),
    "Identity": OpSpec(_one(_identity)),
}


def torch_dtype(onnx_type: int) -> torch.dtype | None:
    """The torch dtype the interpreter holds an ONNX data type in, or None if it has none."""
    return _DTYPES.get(onnx_type)
