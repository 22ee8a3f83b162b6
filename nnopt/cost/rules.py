"""Per-op cost rules (MACs and FLOPs from shapes) and the registry that maps op types to them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import onnx

from nnopt.errors import PluginError

# ---------------------------------------------------------------------------------------------- dtypes
_SUB_BYTE_BITS = {
    name: bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}


def _build_element_bits() -> dict[int, int]:
    bits: dict[int, int] = {}
    for name, code in onnx.TensorProto.DataType.items():
        if name in ("UNDEFINED", "STRING"):
            continue  # NOTE: strings have no fixed size; their bytes are not counted.
        if name in _SUB_BYTE_BITS:
            bits[code] = _SUB_BYTE_BITS[name]
            continue
        try:
            bits[code] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code)).itemsize * 8
        except (KeyError, TypeError, ValueError):
            continue
    return bits


#: Bits per element of each ONNX tensor data type; sub-byte types are packed as stored on disk.
ELEMENT_BITS: dict[int, int] = _build_element_bits()


def tensor_nbytes(data_type: int | None, numel: int | None) -> int | None:
    """Bytes of ``numel`` elements of ``data_type`` as stored (sub-byte types packed, rounded up)."""
    if data_type is None or numel is None:
        return None
    bits = ELEMENT_BITS.get(data_type)
    if bits is None:
        return None
    return (numel * bits + 7) // 8


@dataclass(frozen=True)
class TensorInfo:
    """What the analysis knows about one tensor.

    Attributes:
        name: Tensor name.
        dtype: ONNX ``TensorProto.DataType`` code, or None when unknown.
        shape: The concrete shape, or None unless every dim is known.
        is_constant: True for initializers and outputs of Constant (and constant-shape ConstantOfShape)
            nodes.
    """

    name: str
    dtype: int | None
    shape: tuple[int, ...] | None
    is_constant: bool = False

    @property
    def numel(self) -> int | None:
        """Number of elements, or None when the shape is unknown."""
        return None if self.shape is None else math.prod(self.shape)

    @property
    def nbytes(self) -> int | None:
        """Bytes as stored, or None when the shape or the element size is unknown."""
        return tensor_nbytes(self.dtype, self.numel)


# ---------------------------------------------------------------------------------------------- context
class UnknownShapeError(Exception):
    """A rule needed a shape that the analysis could not determine; the node is then costed as 0."""


@dataclass
class Cost:
    """What a rule returns: multiply-accumulates, FLOPs, and any extra per-node figures to report."""

    macs: int = 0
    flops: int = 0
    extra: dict[str, float] = field(default_factory=dict)


#: A cost rule function. Returning a ``(macs, flops)`` tuple is accepted as shorthand for ``Cost``.
CostFn = Callable[["CostContext"], Cost | tuple[int, int]]


class CostContext:
    """What a cost rule sees of one node.

    Shape accessors raise :class:`UnknownShapeError` when a shape is unknown, so rules can be written
    without None checks; the analysis then counts the node as 0 FLOPs and adds a note.
    """

    def __init__(
        self,
        node: onnx.NodeProto,
        inputs: list[TensorInfo | None],
        outputs: list[TensorInfo | None],
        opset: int | None,
        constant_loader: Callable[[str], np.ndarray | None],
    ) -> None:
        """Create the context.

        Args:
            node: The node.
            inputs: Per input position, its TensorInfo, or None for an omitted optional input.
            outputs: Per output position, likewise.
            opset: The opset version of the node's domain in the model, if imported.
            constant_loader: Returns a constant tensor's values by name (None if not a constant or its
                data is not loaded); values are materialised only when a rule asks.
        """
        self.node = node
        self.inputs = inputs
        self.outputs = outputs
        self.opset = opset
        self._load = constant_loader

    @property
    def op_type(self) -> str:
        """The node's op type."""
        return self.node.op_type

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Attribute values by name (strings decoded from bytes)."""
        values = {}
        for attr in self.node.attribute:
            value = onnx.helper.get_attribute_value(attr)
            values[attr.name] = value.decode() if isinstance(value, bytes) else value
        return values

    def attr(self, name: str, default: Any = None) -> Any:
        """One attribute value, or ``default`` when the node does not set it."""
        return self.attrs.get(name, default)

    def has_input(self, index: int) -> bool:
        """Whether input ``index`` is present (not omitted)."""
        return index < len(self.inputs) and self.inputs[index] is not None

    def input_shape(self, index: int) -> tuple[int, ...]:
        """The concrete shape of input ``index``."""
        return self._shape(self.inputs, index, "input")

    def output_shape(self, index: int = 0) -> tuple[int, ...]:
        """The concrete shape of output ``index``."""
        return self._shape(self.outputs, index, "output")

    def input_numel(self, index: int = 0) -> int:
        """Elements of input ``index``."""
        return math.prod(self.input_shape(index))

    def output_numel(self, index: int = 0) -> int:
        """Elements of output ``index``."""
        return math.prod(self.output_shape(index))

    def constant(self, index: int) -> np.ndarray | None:
        """The values of input ``index`` when it is a constant with loaded data, else None."""
        if not self.has_input(index):
            return None
        info = self.inputs[index]
        assert info is not None
        return self._load(info.name) if info.is_constant else None

    def _shape(self, infos: list[TensorInfo | None], index: int, kind: str) -> tuple[int, ...]:
        info = infos[index] if index < len(infos) else None
        if info is None or info.shape is None:
            name = info.name if info is not None else f"#{index}"
            raise UnknownShapeError(f"{kind} {index} ('{name}') has no known shape")
        return info.shape


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class CostRule:
    """How to cost one op type over a range of opset versions.

    Attributes:
        op_type: The op type, e.g. ``"Conv"``.
        domain: The op's domain; ``""`` and ``"ai.onnx"`` are the same default domain.
        fn: Computes the cost of one node from a :class:`CostContext`.
        since_version: First opset version of ``domain`` the rule applies to.
        until_version: Last opset version it applies to (inclusive), or None for no upper bound.
    """

    op_type: str
    domain: str = ""
    fn: CostFn = field(kw_only=True)
    since_version: int = field(default=1, kw_only=True)
    until_version: int | None = field(default=None, kw_only=True)

    def applies_to(self, opset: int | None) -> bool:
        """Whether the rule covers ``opset`` (None, an unimported domain, matches any rule)."""
        if opset is None:
            return True
        return self.since_version <= opset and (self.until_version is None or opset <= self.until_version)

    def overlaps(self, other: CostRule) -> bool:
        """Whether the two rules' version ranges share a version."""
        hi_self = math.inf if self.until_version is None else self.until_version
        hi_other = math.inf if other.until_version is None else other.until_version
        return self.since_version <= hi_other and other.since_version <= hi_self


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


class CostRuleRegistry:
    """Cost rules by (domain, op type), each over a version range.

    Registering a rule whose (domain, op type) and version range overlap an existing rule raises
    :class:`~nnopt.errors.PluginError`, so two plugins cannot silently fight over an op; pass
    ``replace=True`` to take over deliberately (the overlapping rules are removed first).
    """

    def __init__(self, rules: Iterable[CostRule] = ()) -> None:
        """Create a registry holding ``rules``."""
        self._rules: dict[tuple[str, str], list[CostRule]] = {}
        for rule in rules:
            self.register(rule)

    def register(self, rule: CostRule, *, replace: bool = False) -> None:
        """Add ``rule``.

        Raises:
            PluginError: a rule for the same domain and op type covers an overlapping version range and
                ``replace`` is False.
        """
        if rule.until_version is not None and rule.until_version < rule.since_version:
            raise PluginError(
                f"cost rule for {_label(rule.domain, rule.op_type)}: until_version {rule.until_version} "
                f"is below since_version {rule.since_version}"
            )
        key = (_norm_domain(rule.domain), rule.op_type)
        existing = self._rules.setdefault(key, [])
        clashing = [r for r in existing if r.overlaps(rule)]
        if clashing and not replace:
            raise PluginError(
                f"a cost rule for {_label(*key)} over opset versions {_range(clashing[0])} is already "
                f"registered; register with replace=True to override it"
            )
        existing[:] = [r for r in existing if r not in clashing] + [rule]
        existing.sort(key=lambda r: r.since_version)

    def lookup(self, domain: str, op_type: str, opset: int | None) -> CostRule | None:
        """The rule for ``op_type`` of ``domain`` at opset version ``opset``, or None."""
        for rule in self._rules.get((_norm_domain(domain), op_type), ()):
            if rule.applies_to(opset):
                return rule
        return None

    def rules(self) -> list[CostRule]:
        """Every registered rule, sorted by domain, op type and version."""
        return [rule for key in sorted(self._rules) for rule in self._rules[key]]

    def copy(self) -> CostRuleRegistry:
        """An independent registry with the same rules."""
        return CostRuleRegistry(self.rules())

    def __len__(self) -> int:
        return sum(len(rules) for rules in self._rules.values())


def _label(domain: str, op_type: str) -> str:
    return f"{domain}:{op_type}" if _norm_domain(domain) else op_type


def _range(rule: CostRule) -> str:
    return f"{rule.since_version}..{'' if rule.until_version is None else rule.until_version}"


# ------------------------------------------------------------------------------------------- built-in rules
def _zero(ctx: CostContext) -> Cost:
    return Cost()


def _per_output_element(per_element: int) -> CostFn:
    def fn(ctx: CostContext) -> Cost:
        return Cost(flops=per_element * ctx.output_numel(0))

    return fn


def _per_input_element(ctx: CostContext) -> Cost:
    return Cost(flops=ctx.input_numel(0))


def _variadic(ctx: CostContext) -> Cost:
    # Sum/Max/Min/Mean of n inputs take n - 1 binary operations per output element.
    n = sum(1 for i in range(len(ctx.inputs)) if ctx.has_input(i))
    return Cost(flops=max(1, n - 1) * ctx.output_numel(0))


def _matmul_cost(macs: int) -> Cost:
    return Cost(macs=macs, flops=2 * macs)


def _conv(weight_index: int) -> CostFn:
    def fn(ctx: CostContext) -> Cost:
        # W is [C_out, C_in/group, k...]: every output element takes (C_in/group) × kernel-area MACs, so
        # grouped and depthwise convs count only the connections that exist. Bias adds are not counted.
        return _matmul_cost(ctx.output_numel(0) * math.prod(ctx.input_shape(weight_index)[1:]))

    return fn


def _conv_transpose(ctx: CostContext) -> Cost:
    # W is [C_in, C_out/group, k...]: every input element scatters into (C_out/group) × kernel-area outputs.
    return _matmul_cost(ctx.input_numel(0) * math.prod(ctx.input_shape(1)[1:]))


def _gemm(ctx: CostContext) -> Cost:
    a = ctx.input_shape(0)
    k = a[0] if ctx.attr("transA", 0) else a[-1]
    return _matmul_cost(ctx.output_numel(0) * k)


def _matmul(a_index: int) -> CostFn:
    def fn(ctx: CostContext) -> Cost:
        # Output elements (batch × M × N, broadcast included) × K; 1-D operands fall out the same way.
        a = ctx.input_shape(a_index)
        k = a[-2] if ctx.attr("transA", 0) and len(a) >= 2 else a[-1]
        return _matmul_cost(ctx.output_numel(0) * k)

    return fn


def _einsum(ctx: CostContext) -> Cost:
    equation = str(ctx.attr("equation", "")).replace(" ", "")
    lhs = equation.partition("->")[0]
    terms = lhs.split(",")
    sizes: dict[str, int] = {}
    ellipses: list[tuple[int, ...]] = []
    for index, term in enumerate(terms):
        shape = ctx.input_shape(index)
        if "..." in term:
            head, _, tail = term.partition("...")
            n_ellipsis = len(shape) - len(head) - len(tail)
            ellipses.append(shape[len(head) : len(head) + n_ellipsis])
            letters, dims = head + tail, shape[: len(head)] + shape[len(head) + n_ellipsis :]
        else:
            letters, dims = term, shape
        for letter, dim in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    # Every combination of index values is one multiply per extra operand.
    iterations = math.prod(sizes.values()) * (math.prod(np.broadcast_shapes(*ellipses)) if ellipses else 1)
    if len(terms) == 1:
        reduces = ctx.output_numel(0) < ctx.input_numel(0)
        return Cost(flops=ctx.input_numel(0) if reduces else 0)
    return _matmul_cost(iterations * (len(terms) - 1))


def _rnn(ctx: CostContext) -> Cost:
    # X is [seq, batch, input] (layout 0) or [batch, seq, input]; W is [dirs, gates × hidden, input] and
    # R is [dirs, gates × hidden, hidden], so per step and batch row the gate matmuls take |W| + |R| MACs.
    # Gate activations and the elementwise cell update are not counted.
    x = ctx.input_shape(0)
    seq, batch = (x[1], x[0]) if ctx.attr("layout", 0) else (x[0], x[1])
    return _matmul_cost(seq * batch * (ctx.input_numel(1) + ctx.input_numel(2)))


def _pool(ctx: CostContext) -> Cost:
    kernel = ctx.attr("kernel_shape") or []
    return Cost(flops=ctx.output_numel(0) * math.prod(kernel))


def _attention(ctx: CostContext) -> Cost:
    # Q is [B, H, S_q, D] or [B, S_q, H × D]; K likewise with S_kv, plus past_key's length when given.
    # Q·Kᵀ takes |Q| × S_kv MACs and scores·V takes |Y| × S_kv; softmax adds 5 FLOPs per score.
    q, k = ctx.input_shape(0), ctx.input_shape(1)
    s_kv = k[-2] if len(k) == 4 else k[1]
    if ctx.has_input(4):
        s_kv += ctx.input_shape(4)[-2]
    head_dim = q[-1] if len(q) == 4 else q[-1] // max(1, int(ctx.attr("q_num_heads", 1)))
    scores = ctx.input_numel(0) // max(1, head_dim) * s_kv
    macs = (ctx.input_numel(0) + ctx.output_numel(0)) * s_kv
    return Cost(macs=macs, flops=2 * macs + 5 * scores)


def _lrn(ctx: CostContext) -> Cost:
    # Square-and-sum over `size` neighbouring channels, then scale, power and divide.
    return Cost(flops=(int(ctx.attr("size", 1)) + 3) * ctx.output_numel(0))


#: Arithmetic, activations, comparisons, logic and conversions: one FLOP per output element, whether the
#: hardware does it in one instruction or (Exp, Erf, Tanh...) in several.
ELEMENTWISE_OPS: tuple[str, ...] = (
    "Add", "Sub", "Mul", "Div", "Mod", "Pow", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sqrt", "Exp", "Log", "Erf", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh",
    "Acosh", "Atanh", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Swish", "Clip", "Where",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "IsNaN", "IsInf", "Cast", "CastLike",
    "QuantizeLinear", "DequantizeLinear", "Shrink", "Hardmax", "Resize", "Upsample", "GridSample",
    "AffineGrid",
)  # fmt: skip

#: FLOPs per output element of the ops costed per element. Kept in one table so the README can quote it.
PER_ELEMENT_FLOPS: dict[str, int] = {
    **dict.fromkeys(ELEMENTWISE_OPS, 1),
    # Inference BatchNormalization folds to a per-channel scale and shift.
    "BatchNormalization": 2,
    # Mean, variance, normalise, scale, shift.
    "LayerNormalization": 5,
    "InstanceNormalization": 5,
    "GroupNormalization": 5,
    "MeanVarianceNormalization": 5,
    # Square-and-sum, normalise, scale.
    "RMSNormalization": 3,
    "LpNormalization": 3,
    # Min/max scan, scale, round-and-clip.
    "DynamicQuantizeLinear": 3,
    # Max, subtract, exp, sum, divide (LogSoftmax: log instead of divide).
    "Softmax": 5,
    "LogSoftmax": 5,
}

_VARIADIC_OPS = ("Sum", "Max", "Min", "Mean")

#: Ops costed as one FLOP per *input* element: reductions and scans.
PER_INPUT_ELEMENT_OPS: tuple[str, ...] = (
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum", "TopK",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
)  # fmt: skip

#: Ops that only move, reshape or create data: 0 FLOPs (their bytes still count towards latency).
DATA_MOVEMENT_OPS: tuple[str, ...] = (
    "Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements", "GatherND", "Scatter",
    "ScatterElements", "ScatterND", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size", "Identity",
    "Constant", "ConstantOfShape", "Split", "Pad", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
    "Dropout", "Range", "NonZero", "OneHot", "EyeLike", "Trilu", "ReverseSequence", "Compress",
    "CenterCropPad", "Col2Im", "Optional", "OptionalGetElement", "OptionalHasElement", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SplitToSequence", "ConcatFromSequence",
    # Control flow: the node itself does no arithmetic; subgraph bodies are not costed (see analysis).
    "If", "Loop", "Scan",
)  # fmt: skip


def builtin_cost_rules() -> list[CostRule]:
    """The rules nnopt ships, for the default domain and a few com.microsoft fused ops."""
    rules = [
        CostRule("Conv", fn=_conv(1)),
        CostRule("ConvInteger", fn=_conv(1)),
        CostRule("QLinearConv", fn=_conv(3)),
        CostRule("ConvTranspose", fn=_conv_transpose),
        CostRule("Gemm", fn=_gemm),
        CostRule("MatMul", fn=_matmul(0)),
        CostRule("MatMulInteger", fn=_matmul(0)),
        CostRule("QLinearMatMul", fn=_matmul(0)),
        CostRule("Einsum", fn=_einsum),
        CostRule("LSTM", fn=_rnn),
        CostRule("GRU", fn=_rnn),
        CostRule("RNN", fn=_rnn),
        CostRule("AveragePool", fn=_pool),
        CostRule("MaxPool", fn=_pool),
        CostRule("LpPool", fn=_pool),
        CostRule("LRN", fn=_lrn),
        CostRule("Attention", fn=_attention),
        CostRule("FusedConv", "com.microsoft", fn=_conv(1)),
        CostRule("FusedGemm", "com.microsoft", fn=_gemm),
        CostRule("FusedMatMul", "com.microsoft", fn=_matmul(0)),
    ]
    rules += [CostRule(op, fn=_per_output_element(n)) for op, n in PER_ELEMENT_FLOPS.items()]
    rules += [CostRule(op, fn=_variadic) for op in _VARIADIC_OPS]
    rules += [CostRule(op, fn=_per_input_element) for op in PER_INPUT_ELEMENT_OPS]
    rules += [CostRule(op, fn=_zero) for op in DATA_MOVEMENT_OPS]
    return rules


def default_registry() -> CostRuleRegistry:
    """A new registry holding :func:`builtin_cost_rules` (callers may add plugin rules to it)."""
    return CostRuleRegistry(builtin_cost_rules())


# ---------------------------------------------------------------------------------------------- kernel classes
#: Per op type (default domain, plus com.microsoft fused ops), the kernel class it runs as, and which input
#: is its weight (a weight that is not constant makes it ``dynamic_weight``; a Conv weight of shape
#: [C, 1, k...] with group > 1 makes it ``depthwise``; a dense Conv weight [C_out, C_in, k...] with
#: C_in >= ``_BLOCKED_MIN_CHANNELS`` not a multiple of ``_BLOCKED_ALIGNMENT`` makes it ``unblocked_conv``).
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
    ("", "QLinearMatMul"): ("int8", None),
    ("", "MatMulInteger"): ("int8", None),
}

#: onnxruntime's blocked-layout (NCHWc) convs take any input channel count below its block size (16 with
#: AVX-512, 8 with AVX2: the larger is used here) and multiples of 4 above it; other dense convs run as
#: im2col + GEMM (checked on the graphs onnxruntime 1.31 writes with ``optimized_model_filepath``).
_BLOCKED_MIN_CHANNELS = 16
_BLOCKED_ALIGNMENT = 4
_BLOCKABLE_OPS = frozenset({("", "Conv"), ("com.microsoft", "FusedConv")})

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
#: Ops onnxruntime removes, rewiring their readers to their input.
_ELIMINATED = frozenset({"Identity", "Dropout"})


def kernel_classes(
    nodes: list[onnx.NodeProto],
    infos: dict[str, TensorInfo],
    constants: Iterable[str],
    runtime: str | None = None,
    graph_outputs: Iterable[str] = (),
) -> list[str]:
    """The kernel class of each node (in the order given, which must be topological).

    Without a runtime, each node gets the class of its op and weight: ``conv``, ``depthwise``,
    ``unblocked_conv``, ``dynamic_weight`` (when its weight input is not a constant), ``int8`` or
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
      activation (Relu, Clip, Sigmoid, Tanh, LeakyRelu, HardSigmoid, HardSwish) after a Conv, Gemm or
      MatMul. Each only when the tensor it reads goes nowhere else;
    * SiLU: a Sigmoid read only by a Mul of its own input (``x * sigmoid(x)``) is ``fused`` into that
      Mul (onnxruntime's QuickGelu).

    Layout transformations (onnxruntime's NCHWc reorders) and fusions of longer patterns are not modelled.

    Args:
        nodes: The main-graph nodes in topological order.
        infos: Tensor shapes (for the weight shape of a Conv: depthwise or not).
        constants: Names of constant tensors (initializers, Constant outputs).
        runtime: None, or ``"onnxruntime"`` to model its graph rewrites.
        graph_outputs: Names of the graph outputs (a fused epilogue would hide them).
    """
    const = set(constants)
    if runtime is None:
        return [_op_kernel(node, infos, const) for node in nodes]
    graph = _RuntimeGraph(nodes, infos, const, graph_outputs)
    for rewrite in _ONNXRUNTIME_REWRITES:
        rewrite(graph)
    return graph.classes


class _RuntimeGraph:
    """The main graph as a runtime's optimiser sees it: each node's kernel class so far, who produces and who
    reads each tensor, and the tensors eliminated nodes pass through (``alias``). The rewrites of
    ``_ONNXRUNTIME_REWRITES`` run on it in order, each turning some nodes' classes into ``folded``,
    ``fused`` or ``int8``."""

    def __init__(
        self, nodes: list[onnx.NodeProto], infos: dict[str, TensorInfo], const: set[str], graph_outputs: Iterable[str]
    ) -> None:
        self.nodes, self.infos, self.const = nodes, infos, const
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
        self.ops = [node.op_type if _norm_domain(node.domain) == "" else f"{node.domain}:{node.op_type}"
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
        foldable = g.ops[i] not in _NOT_FOLDED and ":" not in g.ops[i] and not _has_graph(node)
        if foldable and all(name in g.const for name in node.input if name):
            g.classes.append("folded")
            g.const.update(name for name in node.output if name)
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
            g.classes[i] = "int8"
        elif not quantized:
            continue
        grouped.add(i)
        for j in quantize if quantized else []:
            g.classes[j] = "fused"
    for i in grouped:
        for name in g.nodes[i].input:
            if name and g.from_dq(name) and all(k in grouped for k in g.readers.get(name, [])):
                g.classes[g.producer[name]] = "fused"


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
        float_kernel = g.classes[i] in ("conv", "depthwise", "unblocked_conv", "dynamic_weight")
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
            if g.ops[j] in _FUSED_ACTIVATIONS and data == tail:
                g.classes[j] = "fused"
            break


def _fuse_silu(g: _RuntimeGraph) -> None:
    """SiLU, ``x * sigmoid(x)``: the Sigmoid is computed inside the Mul."""
    for i, node in enumerate(g.nodes):
        if g.ops[i] != "Sigmoid" or g.classes[i] != "other" or not node.input or not node.output:
            continue
        j = g.only_reader(node.output[0])
        if j is not None and g.ops[j] == "Mul" and g.classes[j] == "other":
            operands = {g.source(name) for name in g.nodes[j].input}
            if operands == {g.source(node.input[0]), node.output[0]}:
                g.classes[i] = "fused"


#: onnxruntime's default graph optimisations as the estimate models them, in the order they apply.
_ONNXRUNTIME_REWRITES: tuple[Callable[[_RuntimeGraph], None], ...] = (
    _fold_constants,
    _fuse_qdq_groups,
    _eliminate_pass_throughs,
    _fuse_epilogues,
    _fuse_silu,
)


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
    kernel, weight_index = _KERNEL_OF_OP.get((_norm_domain(node.domain), node.op_type), ("other", None))
    if weight_index is not None and len(node.input) > weight_index:
        if node.input[weight_index] not in constants:
            return "dynamic_weight"
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = infos.get(node.input[weight_index])
        if weight is None or weight.shape is None or len(weight.shape) < 2:
            return kernel
        if group > 1 and weight.shape[1] == 1:
            return "depthwise"
        channels = weight.shape[1]
        blockable = (_norm_domain(node.domain), node.op_type) in _BLOCKABLE_OPS
        if blockable and group == 1 and channels >= _BLOCKED_MIN_CHANNELS and channels % _BLOCKED_ALIGNMENT:
            return "unblocked_conv"
    return kernel


def _has_graph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
