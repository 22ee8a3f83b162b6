"""Weights a graph decodes at run time from stored constants (kmeans codebooks, hashed-sharing's hashed
values): a registry of patterns.

A decoded weight is counted once, at its logical size: the decoder's output is the weight the model
computes with, and the constants only decoders read (codebook, stored indices, shift tables) count 0
params. Which tensors computed from constants only are decoded weights is what a pattern decides; the
built-in ones recognise what the ``kmeans`` and ``hashed-sharing`` passes write, and passes or plugins that
store weights another way register their own. A decoded weight that only feeds the decoder of another one
(hashed-sharing's gathered values before their sign) is an intermediate: only the outermost counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from nnopt.cost.tensors import TensorInfo
from nnopt.cost.walk import NodeView
from nnopt.errors import PluginError

if TYPE_CHECKING:  # constants imports this module
    from nnopt.cost.constants import Const

#: Data types of codebooks: a Gather from one of these, with indices computed from constants, decodes a weight.
FLOAT_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.BFLOAT16})  # fmt: skip


@dataclass(frozen=True)
class DecodeSite:
    """A tensor computed from constants only, as a pattern sees it.

    Attributes:
        node: The node that produces it (default domain, no subgraph).
        output: Its name (one of ``node``'s outputs).
        constants: The constants in scope, by name (``dtype``, ``shape``, ``nbytes``, ``params``).
        derived: Names of the tensors computed from constants only (``output`` among them).
        decoded: Names of the decoded weights found before this one (in topological order).
    """

    node: onnx.NodeProto
    output: str
    constants: Mapping[str, Const]
    derived: Collection[str]
    decoded: Collection[str] = ()


@dataclass(frozen=True)
class DecodePattern:
    """One way a graph decodes a weight.

    Attributes:
        name: Identifies the pattern (``register`` refuses a second pattern of the same name).
        matches: Whether the site's tensor is a decoded weight. Its output shape must also be known for
            it to count; the constants its computation reads become storage.
    """

    name: str
    matches: Callable[[DecodeSite], bool]


def _gather_from_codebook(site: DecodeSite) -> bool:
    """kmeans: a Gather whose data is a floating-point constant (the codebook) and whose indices are
    computed from constants (stored indices through Cast, BitShift, Reshape, Slice, Add...)."""
    node = site.node
    if node.op_type != "Gather" or len(node.input) != 2 or node.output[0] != site.output:
        return False
    data, indices = node.input
    return data in site.constants and indices in site.derived and site.constants[data].dtype in FLOAT_DTYPES


def _cast_of_narrow_constant(site: DecodeSite) -> bool:
    """fp16 with ``compute=float32``: a Cast to float32 of a float16 or bfloat16 constant (a weight stored
    narrow, widened once when onnxruntime folds the Cast at load)."""
    node = site.node
    if node.op_type != "Cast" or len(node.input) != 1 or node.output[0] != site.output:
        return False
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    source = site.constants.get(node.input[0])
    return to == onnx.TensorProto.FLOAT and source is not None and source.dtype in _NARROW_FLOATS


_NARROW_FLOATS = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def _signed_decoded(site: DecodeSite) -> bool:
    """hashed-sharing: a Mul of a decoded weight (the gathered values) by another tensor computed from constants
    (the ±1 sign gathered by the sign hash)."""
    node = site.node
    if node.op_type != "Mul" or len(node.input) != 2 or node.output[0] != site.output:
        return False
    return all(name in site.derived for name in node.input) and any(name in site.decoded for name in node.input)


#: The patterns nnopt ships.
BUILTIN_DECODE_PATTERNS: tuple[DecodePattern, ...] = (
    DecodePattern("gather-codebook", _gather_from_codebook),
    DecodePattern("cast-narrow-constant", _cast_of_narrow_constant),
    DecodePattern("signed-decoded", _signed_decoded),
)


class DecodePatternRegistry:
    """The decoded-weight patterns an analysis recognises, tried in registration order."""

    def __init__(self, patterns: Iterable[DecodePattern] = ()) -> None:
        """Create a registry holding ``patterns``."""
        self._patterns: dict[str, DecodePattern] = {}
        for pattern in patterns:
            self.register(pattern)

    def register(self, pattern: DecodePattern, *, replace: bool = False) -> None:
        """Add ``pattern``.

        Raises:
            PluginError: a pattern of the same name is registered and ``replace`` is False.
        """
        if pattern.name in self._patterns and not replace:
            raise PluginError(f"a decoded-weight pattern named '{pattern.name}' is already registered")
        self._patterns[pattern.name] = pattern

    def patterns(self) -> list[DecodePattern]:
        """The registered patterns, in registration order."""
        return list(self._patterns.values())

    def matches(self, site: DecodeSite) -> bool:
        """Whether any pattern recognises ``site``."""
        return any(p.matches(site) for p in self._patterns.values())

    def copy(self) -> DecodePatternRegistry:
        """An independent registry with the same patterns."""
        return DecodePatternRegistry(self.patterns())


def default_decode_patterns() -> DecodePatternRegistry:
    """A new registry holding :data:`BUILTIN_DECODE_PATTERNS` (callers may add their own)."""
    return DecodePatternRegistry(BUILTIN_DECODE_PATTERNS)


def decoded_weights(
    nodes: list[NodeView],
    consts: Mapping[str, Const],
    infos: Mapping[str, TensorInfo],
    patterns: DecodePatternRegistry,
) -> tuple[dict[str, int], set[str]]:
    """Weights decoded at run time among ``nodes`` (topologically ordered): output name → elements, and
    the constants that only those decoders read (counted 0 params)."""
    # Tensors computed from constants only, each with the constants and nodes (indices) it comes from.
    derived: dict[str, tuple[frozenset[str], frozenset[int]]] = {}
    for i, node in enumerate(nodes):
        ins = [n for n in node.inputs if n]
        # Checked first: most nodes read an activation, and this rules them out soonest.
        if not all(n in consts or n in derived for n in ins):
            continue
        if not ins or node.domain != "" or node.has_subgraph:
            continue
        sources = frozenset(n for n in ins if n in consts).union(*(derived[n][0] for n in ins if n in derived))
        chain = frozenset({i}).union(*(derived[n][1] for n in ins if n in derived))
        for out in node.outputs:
            if out and out not in consts:
                derived[out] = (sources, chain)
    decoded: dict[str, int] = {}
    chains: dict[str, frozenset[int]] = {}
    candidates: set[str] = set()
    decoder_nodes: set[int] = set()
    for name, (sources, chain) in derived.items():  # topological order: inner decoded weights come first
        node = nodes[max(chain)]  # the node that produced ``name``: the last of its chain
        info = infos.get(name)
        if info is None or info.shape is None:
            continue
        if not patterns.matches(DecodeSite(node.proto, name, consts, derived, decoded)):
            continue
        decoded[name] = math.prod(info.shape)
        chains[name] = chain
        candidates |= sources
        decoder_nodes |= chain
    if not candidates:
        return decoded, set()
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.reads:
            readers.setdefault(name, set()).add(i)
    # An intermediate decoded weight (read only inside another one's decoder) is not a weight of its own.
    # (A tensor's readers are never in its own chain, which ends at its producer.)
    in_chains = {i for chain in chains.values() for i in chain}
    for name in list(decoded):
        if readers.get(name) and readers[name] <= in_chains:
            del decoded[name]
    storage = {n for n in candidates if readers.get(n, set()) <= decoder_nodes}
    return decoded, storage
