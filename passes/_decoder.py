"""The decode subgraphs weight-sharing passes write (kmeans, hashed-sharing): uniquely named constants, variables
and nodes that turn stored constants into a weight, and the bytes those constants take in the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from nnopt.ir.naming import unique_name


@dataclass
class DecoderBuilder:
    """Creates the decode subgraph of one weight, every name ``prefix/label/...`` (prefix: the pass)."""

    prefix: str
    label: str
    taken: set[str]
    nodes: list[gs.Node] = field(default_factory=list)
    constants: list[gs.Constant] = field(default_factory=list)

    def name(self, what: str) -> str:
        return unique_name(f"{self.prefix}/{self.label}/{what}", self.taken)

    def const(self, what: str, values: np.ndarray | LazyValues) -> gs.Constant:
        const = gs.Constant(self.name(what), values)
        self.constants.append(const)
        return const

    def lazy_const(self, what: str, data_type: int, dims: tuple[int, ...], raw: bytes) -> gs.Constant:
        tensor = onnx.TensorProto(name=self.name(what), data_type=data_type, dims=list(dims), raw_data=raw)
        const = gs.Constant(tensor.name, LazyValues(tensor))
        self.constants.append(const)
        return const

    def op(self, op: str, inputs: list[gs.Tensor], dtype: Any, shape: tuple[int, ...], **attrs: Any) -> gs.Variable:
        out = gs.Variable(self.name(op.lower()), dtype=dtype, shape=list(shape))
        self.nodes.append(gs.Node(op, self.name(op), attrs=attrs, inputs=inputs, outputs=[out]))
        return out


def stored_bytes(const: gs.Constant) -> int:
    """Bytes of a constant as written to the file (sub-byte types packed)."""
    values = const._values
    if isinstance(values, LazyValues):
        return len(values.tensor.raw_data)
    return int(np.asarray(values).nbytes)
