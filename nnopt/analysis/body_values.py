"""What ONNX shape inference may read inside subgraph bodies, on the copy it runs on.

ONNX's inference gives an If/Loop body the outer scope's types but not its values, follows constant values
through a few ops only (Shape, Concat, Gather...), and merges an If's two branches. Real models compute their
bodies' shapes from constants all the same (Silero VAD: an STFT padded by a main-graph initializer, or by pads
computed in the branch through a Transpose; an LSTM whose input a nested If picks by a tensor's rank), and
every shape after such a step went unknown, its nodes uncosted. On the copy inference runs on (never the
model), this module copies the small constants of enclosing scopes into the bodies that read them, computes
what follows from constants alone, and, given a first inference's types, takes a Shape of a static tensor as
a constant and an If on a constant condition as the branch it takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnopt.ir.constants import NONDETERMINISTIC_OPS
from nnopt.ir.graphview import graph_protos, outer_scope_reads, subgraph_protos

if TYPE_CHECKING:
    from nnopt.analysis.shapes import TensorType


def show_outer_constants(graph: onnx.GraphProto, limit: int, opsets: Sequence[onnx.OperatorSetIdProto]) -> set[str]:
    """Make the small values of enclosing scopes and of constant arithmetic visible to inference in every body of
    the main ``graph`` (see :func:`_show`); returns the names of the outer constants copied into bodies."""
    copied: set[str] = set()
    _show(graph, {}, limit, opsets, copied)
    return copied


#: Elements of the largest outer-scope constant copied into a subgraph body for inference to read: shape
#: arithmetic needs short vectors (pads, axes, starts), never weights.
SHAPE_DATA_LIMIT = 4096


def _show(
    graph: onnx.GraphProto,
    visible: Mapping[str, onnx.TensorProto],
    limit: int,
    opsets: Sequence[onnx.OperatorSetIdProto],
    copied: set[str],
    body: bool = False,
) -> None:
    """Copy the small constants of enclosing scopes that each body of ``graph`` reads into that body, as
    initializers (their names added to ``copied``); and in a body (``body``), compute the small values that
    follow from constants alone (see :func:`_fold_small_constants`).

    ONNX's inference gives a body the outer scope's types but not its values, so a Pad whose pads are a
    main-graph initializer has an output of unknown length inside an If branch, and so has everything after
    it (Silero VAD: every conv of its branches went uncosted). Inference-only: :func:`hide_outer_constants`
    takes the copies off the result.
    """
    small = _small_constants(graph, visible, limit)
    if body:
        _fold_small_constants(graph, small, limit, opsets)
    for node in graph.node:
        for sub in subgraph_protos(node):
            for name in sorted(outer_scope_reads(sub) & small.keys()):
                sub.initializer.append(small[name])
                copied.add(name)
            _show(sub, small, limit, opsets, copied, body=True)


def _small_constants(
    graph: onnx.GraphProto, visible: Mapping[str, onnx.TensorProto], limit: int
) -> dict[str, onnx.TensorProto]:
    """``visible`` and the initializers and Constant values of ``graph`` of at most ``limit`` elements, with
    their data at hand."""
    own = dict(visible)
    for tensor in graph.initializer:
        own[tensor.name] = tensor
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            value = _constant_tensor(node.attribute[0], node.output[0])
            if value is not None:
                own[node.output[0]] = value
    return {
        name: t for name, t in own.items()
        if t.data_location != onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= limit and _has_data(t)
    }


#: Constant attributes other than a tensor, and the element type of their value.
_SCALAR_ATTRS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}


def _constant_tensor(attr: onnx.AttributeProto, name: str) -> onnx.TensorProto | None:
    """The value of a Constant node's (only) attribute, as a tensor named ``name``; None for sparse and string
    values."""
    if attr.name == "value" and attr.HasField("t"):
        value = onnx.TensorProto()
        value.CopyFrom(attr.t)
        value.name = name
        return value
    if attr.name in _SCALAR_ATTRS:
        return numpy_helper.from_array(np.array(helper.get_attribute_value(attr), _SCALAR_ATTRS[attr.name]), name)
    return None


#: Ops whose outputs are not a function of their inputs' values alone, or that hold bodies of their own.
_NOT_FOLDABLE = NONDETERMINISTIC_OPS | {"Constant", "If", "Loop", "Scan", "SequenceMap"}


def _fold_small_constants(
    body: onnx.GraphProto, known: dict[str, onnx.TensorProto], limit: int, opsets: Sequence[onnx.OperatorSetIdProto]
) -> None:
    """Replace each default-domain node of ``body`` whose inputs are all in ``known`` by Constant nodes of its
    outputs (evaluated by onnx's reference implementation; small ones only), adding them to ``known``.

    Data propagation follows a few ops only (Shape, Concat, Gather...): Silero VAD's branches compute their
    STFT padding from constants through a Slice with a negative step, a Transpose and a Cast, and the
    padded length, with every shape after it, stayed unknown.
    """
    from onnx.reference import ReferenceEvaluator

    rewritten: list[onnx.NodeProto] = []
    folded = False
    for node in body.node:
        inputs = [name for name in node.input if name]
        foldable = (
            node.domain in ("", "ai.onnx") and node.op_type not in _NOT_FOLDABLE
            and inputs and all(name in known for name in inputs)
        )
        values = None
        if foldable:
            try:
                single = helper.make_model(
                    helper.make_graph([node], "fold", [helper.make_tensor_value_info(n, known[n].data_type, None)
                                                      for n in dict.fromkeys(inputs)],
                                      [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                                       for o in node.output if o]),
                    opset_imports=opsets,
                )
                feeds = {n: numpy_helper.to_array(known[n]) for n in dict.fromkeys(inputs)}
                values = ReferenceEvaluator(single).run(None, feeds)
            except Exception:  # noqa: BLE001 - boundary: the reference implementation raises many types
                values = None
        outputs = [o for o in node.output if o]
        if values is None or len(values) != len(outputs) or any(
            not isinstance(v, np.ndarray) or v.size > limit for v in values
        ):
            rewritten.append(node)
            continue
        folded = True
        for name, value in zip(outputs, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            known[name] = tensor
            rewritten.append(helper.make_node("Constant", [], [name], value=tensor))
    if folded:  # the node list is rewritten only when something was folded
        _replace_nodes(body, rewritten)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    # The new list may hold the graph's own nodes: copies first, then the clear.
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def hide_outer_constants(model: onnx.ModelProto, copied: set[str] | None) -> None:
    """Take :func:`show_outer_constants`' copies, named in ``copied``, off the bodies of ``model`` (the
    prepared copy or inference's result): a valid body never has an initializer of an outer scope's name."""
    if not copied:
        return
    bodies = graph_protos(model.graph)
    next(bodies)  # the main graph's initializers are its own
    for graph in bodies:
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name in copied:
                del graph.initializer[i]


def _has_data(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.raw_data) or any(
        len(getattr(tensor, f)) for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    ) or math.prod(tensor.dims) == 0


def refine_bodies(
    graph: onnx.GraphProto, types: Mapping[str, TensorType], limit: int, opsets: Sequence[onnx.OperatorSetIdProto]
) -> bool:
    """A second look at each subgraph body of ``graph`` with the ``types`` a first inference found (see
    :func:`_refine`). Returns whether anything changed (then inference runs once more)."""
    return _refine(graph, types, {}, limit, opsets)


def _refine(
    graph: onnx.GraphProto,
    types: Mapping[str, TensorType],
    visible: Mapping[str, onnx.TensorProto],
    limit: int,
    opsets: Sequence[onnx.OperatorSetIdProto],
    body: bool = False,
) -> bool:
    """A second look at each body of ``graph`` with the ``types`` a first inference found: a Shape of a tensor
    of static shape becomes a Constant, what follows from constants is computed again
    (:func:`_fold_small_constants`), and an If on a constant condition becomes its branch (its nodes, then an
    Identity per output). Returns whether anything changed.

    ONNX's inference merges an If's two branches, and Silero VAD's decoder picks its branch by a tensor's
    rank (``Equal(Gather(Shape(x)), 1)``): the branches' outputs differ, so its LSTM's input, and the LSTM,
    stayed unknown.
    """
    known = _small_constants(graph, visible, limit)
    changed = False
    if body:
        changed |= _shapes_to_constants(graph, types, known)
        if changed:
            _fold_small_constants(graph, known, limit, opsets)
        changed |= _inline_constant_ifs(graph, known)
    for node in graph.node:
        for sub in subgraph_protos(node):
            changed |= _refine(sub, types, known, limit, opsets, body=True)
    return changed


def _shapes_to_constants(graph: onnx.GraphProto, types: Mapping[str, TensorType], known: dict[str, onnx.TensorProto]) -> bool:
    """Replace each Shape of a tensor of static shape in ``graph`` by a Constant of its value (added to ``known``)."""
    changed = False
    for i, node in enumerate(graph.node):
        found = types.get(node.input[0]) if node.op_type == "Shape" and node.domain in ("", "ai.onnx") else None
        dims = found.shape if found is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        value = numpy_helper.from_array(
            np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64), node.output[0]
        )
        known[node.output[0]] = value
        graph.node[i].CopyFrom(helper.make_node("Constant", [], [node.output[0]], value=value))
        changed = True
    return changed


def _inline_constant_ifs(graph: onnx.GraphProto, known: Mapping[str, onnx.TensorProto]) -> bool:
    """Replace each If of ``graph`` whose condition is in ``known`` by the branch it takes: the branch's
    initializers as Constant nodes, its nodes, and an Identity from each branch output to the If's."""
    changed = False
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        condition = known.get(node.input[0]) if node.op_type == "If" and node.domain in ("", "ai.onnx") else None
        if condition is None:
            nodes.append(node)
            continue
        taken = "then_branch" if bool(numpy_helper.to_array(condition).reshape(-1)[0]) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == taken)
        # Copies of outer constants (``show_outer_constants``) are in scope here already.
        nodes.extend(
            helper.make_node("Constant", [], [t.name], value=t) for t in branch.initializer if t.name not in known
        )
        nodes.extend(branch.node)
        nodes.extend(
            helper.make_node("Identity", [inner.name], [outer]) for inner, outer in zip(branch.output, node.output) if outer
        )
        changed = True
    if changed:
        _replace_nodes(graph, nodes)
    return changed
