"""Model: an onnx-graphsurgeon graph plus everything graphsurgeon does not carry, with lossless load/save."""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import glob
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from nnopt.errors import ModelLoadError, OutputError, UnsafeExternalDataError, first_line
from nnopt.ir.graphview import graph_protos

#: Protobuf cannot serialise a message of 2 GiB or more; above this many tensor bytes nnopt writes
#: weights to an external-data file (and validates through files rather than in-memory bytes).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class Model:
    """A mutable ONNX model.

    ``graph`` is an onnx-graphsurgeon ``Graph`` that passes edit in place. The remaining fields hold what
    graphsurgeon's import/export would otherwise drop, so that ``Model.from_proto(p).to_proto()`` keeps
    every opset import, the model's metadata, node doc strings and the placement of outer-scope
    initializers that only subgraphs use.
    """

    graph: gs.Graph
    opset_imports: dict[str, int]
    ir_version: int
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list[tuple[str, str]] = field(default_factory=list)
    #: Per node name: (doc_string, metadata_props) of nodes that had them; graphsurgeon drops both.
    node_extras: dict[str, tuple[str, list[tuple[str, str]]]] = field(default_factory=dict)
    #: Names of top-level initializers. A constant with one of these names that only a subgraph uses is
    #: written back at the top level (graphsurgeon would move it into every subgraph that uses it).
    top_level_initializers: set[str] = field(default_factory=set)
    #: True when the model was loaded with external data; it is then saved the same way.
    external_data: bool = False
    #: Initializers that are also graph inputs (IR >= 4): inputs with a default value. They are graph
    #: inputs (Variables) to passes, since a caller may feed them, and are written back as initializers.
    input_defaults: dict[str, onnx.TensorProto] = field(default_factory=dict)
    #: The original order of the graph inputs, initializer-inputs included, to write them back in order.
    input_order: list[str] = field(default_factory=list)
    #: Names that had value_info in the input. Only those get value_info on export: shapes a pass infers
    #: along the way are not written out, so the file does not grow with annotations it never had.
    value_info_names: set[str] = field(default_factory=set)
    #: Types graphsurgeon cannot represent (maps, optionals, sequences of them: a ZipMap's
    #: ``seq(map(int64, float))``) by value name; written back as they were.
    rich_types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    #: Whether the input held tensors of sub-byte types (int4, float4, int2...): see
    #: ``_repack_loaded_sub_byte_constants``.
    has_packed_tensors: bool = False
    #: Training info is not edited by nnopt, but kept.
    training_info: list[onnx.TrainingInfoProto] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, *, copy_proto: bool = True) -> Model:
        """Import a ModelProto (with its external data already loaded). The proto is not modified.

        graphsurgeon keeps large tensors as lazy references into the proto and renames them there on
        export, so by default the model works on a private copy; ``copy_proto=False`` is for callers
        that hand over a proto nobody else holds (a freshly loaded file).
        """
        if copy_proto:
            proto = copy.deepcopy(proto)
        _drop_interface_value_info(proto.graph)
        graph = gs.import_onnx(proto)
        input_names = [i.name for i in proto.graph.input]
        defaults = {}
        if proto.ir_version >= 4:
            defaults = {t.name: t for t in proto.graph.initializer if t.name in set(input_names)}
            if defaults:
                _initializer_inputs_to_variables(graph, proto, defaults)
        extras: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        for node in _iter_node_protos(proto.graph):
            props = [(p.key, p.value) for p in node.metadata_props]
            if node.name and (node.doc_string or props):
                extras[node.name] = (node.doc_string, props)
        return cls(
            graph=graph,
            opset_imports={op.domain: op.version for op in proto.opset_import},
            ir_version=proto.ir_version,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata_props=[(p.key, p.value) for p in proto.metadata_props],
            node_extras=extras,
            top_level_initializers={t.name for t in proto.graph.initializer},
            training_info=[copy.deepcopy(t) for t in proto.training_info],
            input_defaults={name: copy.deepcopy(t) for name, t in defaults.items()},
            input_order=input_names,
            value_info_names={v.name for g in graph_protos(proto.graph) for v in g.value_info},
            rich_types=_rich_types(proto.graph),
            has_packed_tensors=_has_packed_tensors(proto.graph),
        )

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto. Tensor data is copied; the Model stays usable."""
        opsets = dict(self.opset_imports)
        for g in [self.graph, *self.graph.subgraphs(recursive=True)]:
            for node in g.nodes:
                # NOTE: a domain first used by a pass needs an opset import; "" always has one.
                opsets.setdefault(node.domain or "", 1)
        if self.has_packed_tensors:
            _repack_loaded_sub_byte_constants(self)
        with _rich_types_hidden(self):
            proto = gs.export_onnx(
                self.graph,
                do_type_check=False,
                opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
            )
        if self.rich_types:
            _write_rich_types(proto.graph, self.rich_types)
        proto.ir_version = self.ir_version
        # NOTE: ONNX is proto2: a field assigned even an empty value is serialised, so set only what the
        # input had (an untouched model must not grow by a few bytes).
        for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            value = getattr(self, name)
            if value:
                setattr(proto, name, value)
            else:
                proto.ClearField(name)
        del proto.metadata_props[:]
        for key, value in self.metadata_props:
            proto.metadata_props.add(key=key, value=value)
        proto.training_info.extend(self.training_info)
        _hoist_outer_initializers(proto.graph, self.top_level_initializers)
        for g in graph_protos(proto.graph):
            if any(v.name not in self.value_info_names for v in g.value_info):
                kept = [v for v in g.value_info if v.name in self.value_info_names]
                del g.value_info[:]
                g.value_info.extend(kept)
        self._restore_initializer_inputs(proto)
        if self.node_extras:
            for node in _iter_node_protos(proto.graph):
                extra = self.node_extras.get(node.name)
                if extra is not None:
                    if extra[0]:  # onnx.proto is proto2: assigning "" would serialise an empty field
                        node.doc_string = extra[0]
                    for key, value in extra[1]:
                        node.metadata_props.add(key=key, value=value)
        return proto

    def _restore_initializer_inputs(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        present = {i.name for i in g.input}
        for name, tensor in self.input_defaults.items():
            if name in present:
                g.initializer.append(tensor)
        if self.ir_version < 4:
            # NOTE: before IR 4 every initializer must also be listed as a graph input.
            for t in g.initializer:
                if t.name not in present:
                    g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
                    present.add(t.name)
        rank = {name: i for i, name in enumerate(self.input_order)}
        if any(i.name in rank for i in g.input):
            ordered = sorted(g.input, key=lambda i: rank.get(i.name, len(rank)))
            if [i.name for i in ordered] != [i.name for i in g.input]:
                copies = [copy.deepcopy(i) for i in ordered]
                del g.input[:]
                g.input.extend(copies)

    def restore(self, proto: onnx.ModelProto) -> None:
        """Replace this model's contents, in place, with ``proto`` (a snapshot from ``to_proto``).

        The snapshot itself stays untouched, so it can serve another rollback.
        """
        external = self.external_data
        self.__dict__.update(Model.from_proto(proto, copy_proto=True).__dict__)
        self.external_data = external

    def copy(self) -> Model:
        """A deep copy (through the proto, so weight arrays are never shared with the original)."""
        clone = Model.from_proto(self.to_proto(), copy_proto=False)
        clone.external_data = self.external_data
        return clone

    @property
    def opset(self) -> int:
        """The default-domain ("ai.onnx") opset version."""
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))

    def all_graphs(self) -> list[gs.Graph]:
        """The main graph followed by every subgraph (If/Loop/Scan bodies), recursively."""
        return [self.graph, *self.graph.subgraphs(recursive=True)]


# ---------------------------------------------------------------------------------------------- loading
def load_model(source: str | os.PathLike[str] | onnx.ModelProto) -> Model:
    """Load a model from a path or a ModelProto into nnopt's IR.

    Raises:
        ModelLoadError: the path does not exist, is not an ONNX protobuf, is truncated or corrupt, the
            onnx checker rejects the model, or it holds what nnopt cannot carry through (a string that is
            not UTF-8, an unknown data type, an empty list attribute, no graph output, external data
            that is out of bounds or does not match its tensor's shape).
        UnsafeExternalDataError: an external-data location points outside the model's folder.
    """
    if isinstance(source, onnx.ModelProto):
        proto = copy.deepcopy(source)
        _check_not_empty(proto, "the ModelProto")
        _check_structure(proto, "the ModelProto")
        _run_checker(proto, "the ModelProto")
        uses_external = any(external_data_helper.uses_external_data(t) for t in _all_tensors(proto))
        if uses_external:
            raise ModelLoadError(
                "the ModelProto refers to external data that is not loaded; load it from its path instead"
            )
        return Model.from_proto(proto, copy_proto=False)
    proto, uses_external = read_model_proto(Path(source))
    model = Model.from_proto(proto, copy_proto=False)
    model.external_data = uses_external
    return model


def read_model_proto(path: Path) -> tuple[onnx.ModelProto, bool]:
    """Read, validate and fully load the ModelProto at ``path``; also say whether it used external data."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (the protobuf does not parse: {exc})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    _check_not_empty(proto, str(path))
    _check_structure(proto, str(path))
    external = [t for t in _all_tensors(proto) if external_data_helper.uses_external_data(t)]
    base_dir = path.resolve().parent
    for tensor in external:
        _check_external_location(tensor, base_dir, path)
    if external:
        external_data_helper.load_external_data_for_model(proto, str(base_dir))
    # The checker validates through the path when the model is too large to serialise in memory.
    _run_checker(proto if not external else str(path), str(path))
    return proto, bool(external)


def _check_not_empty(proto: onnx.ModelProto, where: str) -> None:
    # NOTE: protobuf parses an empty file (or many short byte strings) into an empty, "valid" message.
    if proto.ir_version == 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: not an ONNX model (no ir_version or graph; empty or not a ModelProto)")


# ---------------------------------------------------------------------------------------------- sub-byte types
#: Element types onnx packs several to a byte.
_PACKED_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
)


def _has_packed_tensors(graph: onnx.GraphProto) -> bool:
    return any(
        t.data_type in _PACKED_TYPES
        for g in graph_protos(graph)
        for t in (*g.initializer, *(a.t for n in g.node for a in n.attribute if a.HasField("t")))
    )


def _repack_loaded_sub_byte_constants(model: Model) -> None:
    """Give constants of packed types whose values a pass has read back as TensorProtos, packed.

    graphsurgeon exports a loaded numpy array with ``tobytes()``: one byte per float4 or int4 element,
    twice what the type's raw data holds, so the model could not be saved. onnx packs them correctly.
    """
    for graph in model.all_graphs():
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, np.ndarray):
                try:
                    code = onnx.helper.np_dtype_to_tensor_dtype(tensor._values.dtype)
                except (KeyError, ValueError, TypeError):
                    continue
                if code in _PACKED_TYPES:
                    tensor._values = LazyValues(onnx.numpy_helper.from_array(tensor._values, tensor.name))


# ---------------------------------------------------------------------------------------------- rich types
def _is_rich(type_: onnx.TypeProto) -> bool:
    """Whether graphsurgeon loses this type: a map or optional, also inside a sequence."""
    kind = type_.WhichOneof("value")
    if kind == "sequence_type":
        return type_.sequence_type.HasField("elem_type") and _is_rich(type_.sequence_type.elem_type)
    return kind in ("map_type", "optional_type")


def _rich_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    return {
        v.name: copy.deepcopy(v.type)
        for g in graph_protos(graph)
        for v in (*g.input, *g.output, *g.value_info)
        if _is_rich(v.type)
    }


@contextlib.contextmanager
def _rich_types_hidden(model: Model) -> Iterator[None]:
    """Export values of rich types untyped: graphsurgeon has no exporter for them (it fails on a map)."""
    if not model.rich_types:
        yield
        return
    hidden = [
        (tensor, tensor.dtype)
        for g in model.all_graphs()
        for name, tensor in g.tensors().items()
        if name in model.rich_types and not isinstance(tensor, gs.Constant)
    ]
    for tensor, _ in hidden:
        tensor.dtype = None
    try:
        yield
    finally:
        for tensor, dtype in hidden:
            tensor.dtype = dtype


def _write_rich_types(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    for g in graph_protos(graph):
        for value in (*g.input, *g.output, *g.value_info):
            rich = types.get(value.name)
            if rich is not None:
                value.type.CopyFrom(rich)


def _check_structure(proto: onnx.ModelProto, where: str) -> None:
    """Refuse what the onnx checker lets through but nnopt's IR cannot represent or write back.

    One walk over every message of the proto (tensor data is not read): string fields must be valid
    UTF-8, data type codes known, list attributes non-empty, and the graph must have an output.

    Raises:
        ModelLoadError: one line naming ``where``, the offending field, tensor, node or attribute.
    """
    if not proto.graph.output:
        raise ModelLoadError(f"{where}: the graph has no outputs; a model must compute at least one")
    _scan_message(proto, "model", where)
    _check_rank_operands(proto.graph, where)


#: Operands whose length is the rank of the node's output: (op_type, input index).
_RANK_OPERANDS = {("Expand", 1), ("Reshape", 1), ("ConstantOfShape", 0)}
#: The longest such operand nnopt accepts. ONNX shape inference builds the output shape dim by dim: an
#: int64[2^40] input feeding an Expand took it past 9 GB before anything else ran.
MAX_RANK = 1024


def _check_rank_operands(graph: onnx.GraphProto, where: str) -> None:
    declared: dict[str, list[int]] = {}
    for g in graph_protos(graph):
        for t in g.initializer:
            declared[t.name] = list(t.dims)
        for v in (*g.input, *g.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                declared[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for g in graph_protos(graph):
        for node in g.node:
            for op_type, index in _RANK_OPERANDS:
                if node.op_type == op_type and node.domain in ("", "ai.onnx") and len(node.input) > index:
                    dims = declared.get(node.input[index], [])
                    if len(dims) == 1 and dims[0] > MAX_RANK:
                        raise ModelLoadError(
                            f"{where}: node '{node.name}' ({op_type}) takes its output rank from "
                            f"'{node.input[index]}', declared with {dims[0]:,} values (at most {MAX_RANK:,})"
                        )


def _scan_message(message: Message, path: str, where: str) -> None:
    children: list[tuple[Message, str]] = []
    for fd in _text_and_message_fields(message.DESCRIPTOR):
        name = fd.name
        if fd.is_repeated:
            values = getattr(message, name)
            if not values:
                continue
        elif message.HasField(name):
            values = (getattr(message, name),)
        else:
            continue
        if fd.type == fd.TYPE_STRING:
            # NOTE: protobuf (upb) hands back a proto2 string that is not UTF-8 as bytes, not str.
            bad = next((v for v in values if isinstance(v, bytes)), None)
            if bad is not None:
                raise ModelLoadError(f"{where}: {path}.{name} is not valid UTF-8 ({bad[:40]!r})")
        elif fd.is_repeated:
            children.extend((item, f"{path}.{name}[{i}]") for i, item in enumerate(values))
        else:
            children.append((values[0], f"{path}.{name}"))
    check = _MESSAGE_CHECKS.get(message.DESCRIPTOR.full_name)
    if check is not None:
        check(message, path, where)
    for child, child_path in children:
        _scan_message(child, child_path, where)


@functools.cache
def _text_and_message_fields(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    # Only these are read: bytes and numbers (raw_data, float_data, ...) would be copied for nothing.
    kinds = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE)
    return tuple(fd for fd in descriptor.fields if fd.type in kinds)


_KNOWN_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values())

#: AttributeProto list types and the field that holds their values.
_LIST_ATTRIBUTES = {
    onnx.AttributeProto.FLOATS: "floats",
    onnx.AttributeProto.INTS: "ints",
    onnx.AttributeProto.STRINGS: "strings",
    onnx.AttributeProto.TENSORS: "tensors",
    onnx.AttributeProto.GRAPHS: "graphs",
    onnx.AttributeProto.SPARSE_TENSORS: "sparse_tensors",
    onnx.AttributeProto.TYPE_PROTOS: "type_protos",
}


def _check_tensor_type(message: Message, path: str, where: str) -> None:
    assert isinstance(message, onnx.TensorProto)
    if message.data_type not in _KNOWN_DATA_TYPES:
        raise ModelLoadError(f"{where}: tensor '{message.name}' ({path}) has unknown data type code {message.data_type}")
    if any(d < 0 for d in message.dims):
        raise ModelLoadError(f"{where}: tensor '{message.name}' ({path}) has negative dims {list(message.dims)}")
    if math.prod(message.dims) > _MAX_ELEMENTS:
        raise ModelLoadError(f"{where}: tensor '{message.name}' ({path}) has dims {list(message.dims)}, more "
                             "elements than 64-bit sizes can count in bytes")


#: Map keys the ONNX spec allows: integers and strings.
_MAP_KEY_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "STRING")
)


def _check_map_key(message: Message, path: str, where: str) -> None:
    assert isinstance(message, onnx.TypeProto.Map)
    if message.key_type not in _MAP_KEY_TYPES:
        raise ModelLoadError(f"{where}: {path} has map key type code {message.key_type}; keys must be integers or strings")


#: More elements than this in one static shape overflow the 64-bit byte counts of onnxruntime and nnopt.
_MAX_ELEMENTS = 2**60


def _check_shape(message: Message, path: str, where: str) -> None:
    assert isinstance(message, onnx.TensorShapeProto)
    values = [d.dim_value for d in message.dim]  # 0 where unset (a dim_param or an unknown dim)
    for i, value in enumerate(values):
        # -1 is how some exporters (PaddlePaddle: PP-OCR) write an unknown dim, and onnxruntime reads it so;
        # below that, onnxruntime aborts the whole process (a failed C++ assertion) on some models.
        if value < -1:
            raise ModelLoadError(f"{where}: {path}.dim[{i}] has negative dimension {value}")
    count = math.prod(v for v in values if v > 0)
    if count > _MAX_ELEMENTS:
        raise ModelLoadError(f"{where}: {path} has {count:.3g} elements, more than 64-bit sizes can count in bytes")


def _check_elem_type(message: Message, path: str, where: str) -> None:
    assert isinstance(message, (onnx.TypeProto.Tensor, onnx.TypeProto.SparseTensor))
    code = message.elem_type
    if code not in _KNOWN_DATA_TYPES:
        raise ModelLoadError(f"{where}: {path} has unknown element type code {code}")


def _check_node_attributes(message: Message, path: str, where: str) -> None:
    assert isinstance(message, onnx.NodeProto)
    for attr in message.attribute:
        texts = [attr.s] if attr.type == onnx.AttributeProto.STRING else list(attr.strings)
        for text in texts:
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                # onnx-graphsurgeon reads attribute strings as text; ONNX stores them as bytes.
                raise ModelLoadError(
                    f"{where}: attribute '{attr.name}' of node '{message.name}' ({message.op_type}, {path}) "
                    f"is not valid UTF-8 ({text[:40]!r})"
                ) from None
        field_name = _LIST_ATTRIBUTES.get(attr.type)
        if field_name is not None and not attr.ref_attr_name and not getattr(attr, field_name):
            raise ModelLoadError(
                f"{where}: attribute '{attr.name}' of node '{message.name}' ({message.op_type}, {path}) "
                "is a list with no values, which nnopt cannot write back"
            )


#: Per message type (full name): what _scan_message checks besides UTF-8.
_MESSAGE_CHECKS: dict[str, Callable[[Message, str, str], None]] = {
    "onnx.TensorProto": _check_tensor_type,
    "onnx.TypeProto.Tensor": _check_elem_type,
    "onnx.TypeProto.SparseTensor": _check_elem_type,
    "onnx.NodeProto": _check_node_attributes,
    "onnx.TypeProto.Map": _check_map_key,
    "onnx.TensorShapeProto": _check_shape,
}


def _run_checker(proto_or_path: onnx.ModelProto | str, where: str) -> None:
    try:
        onnx.checker.check_model(proto_or_path)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelLoadError(f"{where}: rejected by the onnx checker: {first_line(exc)}") from exc


def _check_external_location(tensor: onnx.TensorProto, base_dir: Path, model_path: Path) -> None:
    # NOTE: read the entries directly: onnx's ExternalDataInfo raises a bare ValueError on a bad offset.
    entries = {entry.key: entry.value for entry in tensor.external_data}  # the last entry wins, as in onnx
    location = entries.get("location", "")
    if "\0" in location:
        raise ModelLoadError(
            f"{model_path}: tensor '{tensor.name}' has external-data location {location!r}, "
            "which contains a NUL byte"
        )
    if not location or os.path.isabs(location) or Path(location).drive:
        raise UnsafeExternalDataError(
            f"{model_path}: tensor '{tensor.name}' has external-data location '{location}', "
            "which is not a relative path inside the model's folder"
        )
    try:
        target = (base_dir / location).resolve()
        if base_dir != target and base_dir not in target.parents:
            raise UnsafeExternalDataError(
                f"{model_path}: tensor '{tensor.name}' has external-data location '{location}', "
                "which points outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{model_path}: external-data file '{location}' of tensor '{tensor.name}' does not exist"
            )
        file_size = target.stat().st_size
    except OSError as exc:  # e.g. a name too long for the file system
        shown = location if len(location) <= 60 else location[:57] + "..."
        raise ModelLoadError(
            f"{model_path}: tensor '{tensor.name}' has external-data location {shown!r}, "
            f"which cannot be read ({exc.strerror or exc})"
        ) from exc
    _check_external_range(tensor, entries, file_size, model_path)


def _check_external_range(
    tensor: onnx.TensorProto, entries: dict[str, str], file_size: int, model_path: Path
) -> None:
    """Refuse an offset or length that is not a count of bytes, or that reaches past the data file's end."""
    where = f"{model_path}: tensor '{tensor.name}'"
    bounds: dict[str, int] = {}
    for key in ("offset", "length"):
        if key in entries:
            value = entries[key]
            if not (value.isascii() and value.isdigit()):
                raise ModelLoadError(f"{where} has external-data {key} {value!r}, which is not a byte count")
            bounds[key] = int(value)
    location = entries["location"]
    offset = bounds.get("offset", 0)
    if offset > file_size:
        raise ModelLoadError(
            f"{where} has external-data offset {offset}, past the end of '{location}' ({file_size} bytes)"
        )
    length = bounds.get("length")
    if length is not None and offset + length > file_size:
        raise ModelLoadError(
            f"{where} needs bytes {offset}..{offset + length} of '{location}', which has {file_size} bytes"
        )
    # NOTE: the checker, given a path, does not compare external bytes with the shape: a short file would
    # load, and nnopt would write a model that onnxruntime rejects.
    itemsize = _ITEMSIZES.get(tensor.data_type)
    available = file_size - offset if length is None else length
    if itemsize is not None and available != math.prod(tensor.dims) * itemsize:
        raise ModelLoadError(
            f"{where} has {available} bytes of external data in '{location}', but its shape {list(tensor.dims)} "
            f"and type need {math.prod(tensor.dims) * itemsize}"
        )


#: Bytes per element of the data types stored one element per whole number of bytes; the others
#: (strings, and the 2-, 4- and 6-bit types, which are packed) have no fixed size to check.
_ITEMSIZES = {
    code: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code)).itemsize
    for code in onnx.TensorProto.DataType.values()
    if onnx.TensorProto.DataType.Name(code)
    not in {"UNDEFINED", "STRING", "UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT6E2M3", "FLOAT6E3M2"}
}


# ---------------------------------------------------------------------------------------------- saving
def tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of all tensor data in the model (initializers and tensor attributes, subgraphs included)."""
    total = 0
    for t in _all_tensors(proto):
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += t.ByteSize()
    return total


def save_model(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike[str],
    external_data: bool | None = None,
    *,
    keep: Collection[Path] = (),
) -> None:
    """Write the model atomically: into a temporary folder beside ``path``, then renamed into place.

    Weights go to an external-data file beside the model (see ``write_proto_atomically`` for its name) when
    ``external_data`` is True, when it is None and the model was loaded with external data, or when the tensors
    would not fit a 2 GiB protobuf. ``keep``: files never deleted as stale data of the model replaced at ``path``.

    Raises:
        OutputError: the model cannot be written there (see ``write_proto_atomically``).
    """
    proto = model.to_proto() if isinstance(model, Model) else model
    if external_data is None:
        external_data = (isinstance(model, Model) and model.external_data) or (
            tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD
        )
    write_proto_atomically(proto, Path(path), external_data, keep=keep)


def write_proto_atomically(
    proto: onnx.ModelProto, path: Path, external_data: bool, *, keep: Collection[Path] = ()
) -> None:
    """Save ``proto`` to ``path`` through a temporary folder and rename; nothing is left on failure.

    External data is named after its content, ``<model name>.<16 hex digits of its sha256>.data``, and is renamed
    into place before the model: a model on disk only ever names a data file that holds its own weights, whenever
    the writer is stopped. Once the new model is in place, the data files of the model it replaced that follow
    this naming scheme (and are not in ``keep``) are deleted.

    Raises:
        OutputError: ``path`` is a special file (a device, a pipe), or the operating system refused a write
            (read-only or full disk, file too large, a parent that is a regular file...); the message is the OS's.
    """
    if path.exists() and not path.is_file() and not path.is_dir():
        raise OutputError(f"{path}: is a special file (a device, pipe or socket); refusing to replace it")
    try:
        _write_proto(proto, path, external_data, {k.resolve() for k in keep})
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or first_line(exc)}") from exc


def _write_proto(proto: onnx.ModelProto, path: Path, external_data: bool, keep: set[Path]) -> None:
    out_dir = make_output_folder(path.resolve().parent)
    remove_stale_temporaries(out_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(), dir=out_dir))
    created: Path | None = None  # a data file this call put in place, removed if the model does not follow
    try:
        tmp_model = tmp_dir / path.name
        stale = _stale_data_files(path, out_dir)
        data_file = None
        if not external_data:
            onnx.save_model(proto, str(tmp_model))
        else:
            # NOTE: a staging name unique to this run: onnx refuses a location that exists in the current directory.
            staging = tmp_dir.name + ".data"
            proto = copy.deepcopy(proto)
            onnx.save_model(proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=staging, size_threshold=1024)
            if (tmp_dir / staging).exists():
                data_file = out_dir / f"{path.name}.{_sha256(tmp_dir / staging)[:16]}.data"
                _relocate(proto, data_file.name)
                tmp_model.write_bytes(proto.SerializeToString())
                created = None if data_file.exists() else data_file
                os.replace(tmp_dir / staging, data_file)
        os.replace(tmp_model, path)
        created = None
        for old in stale - keep - {data_file}:
            old.unlink(missing_ok=True)
    except BaseException:
        if created is not None:
            created.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def bytes_on_disk(path: Path) -> int:
    """A model's size on disk: its .onnx file plus the external data files it names."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path) if f.is_file())


def external_data_files(path: Path) -> set[Path]:
    """The resolved external-data files the model file at ``path`` names; none if it cannot be read as ONNX."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # boundary: any unreadable file simply names no data files
        return set()
    base = path.resolve().parent
    return {
        (base / external_data_helper.ExternalDataInfo(t).location).resolve()
        for t in _all_tensors(proto)
        if external_data_helper.uses_external_data(t) and external_data_helper.ExternalDataInfo(t).location
    }


_TEMPORARY = re.compile(r"\.nnopt-(\d+)-.+")


def temporary_prefix() -> str:
    """The name prefix of nnopt's temporary files and folders beside an output: it holds the writer's process id."""
    return f".nnopt-{os.getpid()}-"


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files and folders left in ``folder`` by nnopt runs that were killed (SIGKILL, a crash).

    A temporary is stale when the process id in its name no longer runs on this machine.
    """
    for entry in folder.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or _running(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # NOTE: on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it runs, as another user
        return True
    return True


def _stale_data_files(path: Path, out_dir: Path) -> set[Path]:
    """The data files named by the model now at ``path`` that follow ``write_proto_atomically``'s scheme."""
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.data")
    # Parsing the old model costs time: only when a data file of ours might exist at all.
    if not path.is_file() or not any(pattern.fullmatch(f.name) for f in out_dir.glob(glob.escape(path.name) + ".*")):
        return set()
    return {f for f in external_data_files(path) if f.parent == out_dir and pattern.fullmatch(f.name)}


def _relocate(proto: onnx.ModelProto, location: str) -> None:
    """Point every external tensor at ``location`` (onnx's set_external_data wants the raw data present)."""
    for tensor in _all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


def make_output_folder(folder: Path) -> Path:
    """Create ``folder`` and its parents; a regular file in the way is ENOTDIR, not mkdir's 'File exists'."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{os.strerror(errno.ENOTDIR)}: {parent}", str(parent))
            break
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- helpers


def _iter_node_protos(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in graph_protos(graph):
        yield from g.node


def _all_tensors(proto: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    return external_data_helper._get_all_tensors(proto)


def _hoist_outer_initializers(graph: onnx.GraphProto, top_level: set[str]) -> None:
    """Put constants that subgraphs share, or that the model kept at the top level, back at the top.

    graphsurgeon writes a constant into every graph whose nodes use it: an initializer that only an If
    body used, or that both branches use, would move into (and be duplicated across) the subgraphs. ONNX
    lets subgraphs read outer-scope names, so one top-level copy serves them all.
    """
    top_names = {t.name for t in graph.initializer}
    seen_in: dict[str, int] = {}
    subgraphs = list(graph_protos(graph))[1:]
    for sub in subgraphs:
        for t in sub.initializer:
            seen_in[t.name] = seen_in.get(t.name, 0) + 1
    hoist = {name for name, n in seen_in.items() if n > 1 or name in top_level or name in top_names}
    if not hoist:
        return
    for sub in subgraphs:
        keep = []
        for t in sub.initializer:
            if t.name in hoist:
                if t.name not in top_names:
                    graph.initializer.append(t)
                    top_names.add(t.name)
            else:
                keep.append(t)
        if len(keep) != len(sub.initializer):
            del sub.initializer[:]
            sub.initializer.extend(keep)


def _drop_interface_value_info(graph: onnx.GraphProto) -> None:
    """Remove value_info entries that repeat a graph input or output (in every graph, in place).

    graphsurgeon lets such an entry override the interface's declared type: a shapeless entry for an
    output would erase its shape, and a static one for an input would pin its dynamic dims.
    """
    for g in graph_protos(graph):
        interface = {v.name for v in g.input} | {v.name for v in g.output}
        if any(v.name in interface for v in g.value_info):
            kept = [v for v in g.value_info if v.name not in interface]
            del g.value_info[:]
            g.value_info.extend(kept)


def _initializer_inputs_to_variables(
    graph: gs.Graph, proto: onnx.ModelProto, defaults: dict[str, onnx.TensorProto]
) -> None:
    """Turn constants that are also graph inputs back into graph inputs, in their original positions."""
    tensors = graph.tensors()
    by_name = {i.name: i for i in proto.graph.input}
    inputs: list[gs.Tensor] = []
    for value_info in proto.graph.input:
        name = value_info.name
        if name not in defaults:
            inputs.append(tensors[name] if name in tensors else next(t for t in graph.inputs if t.name == name))
            continue
        const = tensors.get(name)
        tensor_type = by_name[name].type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        variable = gs.Variable(name, dtype=onnx.helper.tensor_dtype_to_np_dtype(defaults[name].data_type), shape=shape)
        if const is not None:
            replace_tensor(graph, const, variable)
        inputs.append(variable)
    graph.inputs[:] = inputs


def replace_tensor(
    graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, *, graphs: Sequence[gs.Graph] | None = None
) -> None:
    """Make every consumer of ``old`` (nodes and graph outputs, subgraphs included) read ``new``.

    ``graphs`` are the graphs whose outputs may name ``old``: ``graph`` and all its subgraphs, which is
    what None computes. Finding the subgraphs walks every node, so a pass that replaces tensors node by
    node lists them once and passes them in (otherwise the pass is quadratic in the node count).
    """
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    if graphs is None:
        graphs = [graph, *graph.subgraphs(recursive=True)]
    for g in graphs:
        for i, t in enumerate(g.outputs):
            if t is old:
                g.outputs[i] = new


def splice_nodes(graph: gs.Graph, replacements: Mapping[int, Sequence[gs.Node]]) -> None:
    """Put each node of ``graph`` whose id is a key of ``replacements`` where its replacement nodes go.

    One walk over the graph for any number of rewrites: finding each rewritten node's index and splicing
    the list there would walk (and shift) the whole node list once per rewrite.
    """
    if replacements:
        graph.nodes = [new for node in graph.nodes for new in replacements.get(id(node), (node,))]

