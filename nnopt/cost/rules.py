"""Per-op cost rules (MACs and FLOPs from shapes) and the registry that maps op types to them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import onnx

# kernel_classes, ELEMENT_BITS and tensor_nbytes lived here before the package was split; kept importable.
from nnopt.cost.runtime_kernels import kernel_classes  # noqa: F401
from nnopt.cost.tensors import ELEMENT_BITS, TensorInfo, norm_domain, tensor_nbytes  # noqa: F401
from nnopt.errors import PluginError


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

    @property
    def label(self) -> str:
        """How listings name the rule's op: ``Conv``, or ``com.example:FancyOp`` for another domain."""
        return _label(self.domain, self.op_type)

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
        key = (norm_domain(rule.domain), rule.op_type)
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
        for rule in self._rules.get((norm_domain(domain), op_type), ()):
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
    return f"{domain}:{op_type}" if norm_domain(domain) else op_type


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


