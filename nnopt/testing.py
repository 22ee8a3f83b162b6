"""Helpers for testing passes, nnopt's own and plugins': tiny models from ONNX text, runs, contract checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx.parser

from nnopt.ir.model import Model
from nnopt.pipeline.base import Pass, PassContext, PassResult
from nnopt.runtime import generate_samples, make_session


def model_from_text(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Parse a model in ONNX text syntax and attach ``initializers`` (name → array)."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto)
    return proto


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    """Outputs of ``proto`` in onnxruntime (graph optimisations off)."""
    return make_session(proto).run(None, feeds)


def random_feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return generate_samples(make_session(proto), count=1, seed=seed)[0]


def apply_pass(pass_: Pass, proto: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass directly (no manager) on a copy of ``proto``; return the result model and report."""
    model = Model.from_proto(proto)
    result = pass_.run(model, ctx or PassContext())
    return model.to_proto(), result


def assert_lossless(pass_: Pass, proto: onnx.ModelProto, *, rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0) -> tuple[onnx.ModelProto, PassResult]:
    """Apply the pass, check the result with the onnx checker and compare outputs in onnxruntime.

    Also checks determinism: a second run on the same input gives byte-identical output.
    """
    out, result = apply_pass(pass_, proto)
    onnx.checker.check_model(out)
    feeds = random_feeds(proto, seed)
    for a, b in zip(run(proto, feeds), run(out, feeds)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
    again, _ = apply_pass(type(pass_)(pass_.options), proto)
    assert again.SerializeToString() == out.SerializeToString(), f"pass {pass_.name} is not deterministic"
    return out, result


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]
