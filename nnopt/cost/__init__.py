"""Cost model: static params/MACs/FLOPs/bytes with a roofline latency estimate, and measured latency.

One concept per module: ``analysis`` (``analyze``, and the conventions its figures follow), ``inputs``
(graph-input shapes), ``shapes`` (tensor shapes: ONNX inference, then onnxruntime), ``constants`` (what
weights a graph holds), ``decoded`` (weights decoded at run time: a pattern registry), ``rules`` (per-op
cost rules and their registry), ``runtime_kernels`` (kernel classes and onnxruntime's graph rewrites),
``nodes`` (costing each node), ``notes`` and ``report`` (the result), ``hardware``, ``timing``, ``calibrate``.
"""

from __future__ import annotations

from nnopt.cost.analysis import analyze, analyze_with_plugins
from nnopt.cost.decoded import DecodePattern, DecodePatternRegistry, DecodeSite, default_decode_patterns
from nnopt.cost.hardware import BUILTIN_PROFILES, DEFAULT_PROFILE, HardwareProfile, parse_hardware
from nnopt.cost.inputs import parse_input_shapes
from nnopt.cost.report import CostReport
from nnopt.cost.rules import (
    Cost,
    CostContext,
    CostRule,
    CostRuleRegistry,
    UnknownShapeError,
    builtin_cost_rules,
    default_registry,
)
from nnopt.cost.tensors import TensorInfo

__all__ = [
    "BUILTIN_PROFILES",
    "DEFAULT_PROFILE",
    "Cost",
    "CostContext",
    "CostReport",
    "CostRule",
    "CostRuleRegistry",
    "DecodePattern",
    "DecodePatternRegistry",
    "DecodeSite",
    "HardwareProfile",
    "TensorInfo",
    "UnknownShapeError",
    "analyze",
    "analyze_with_plugins",
    "builtin_cost_rules",
    "default_decode_patterns",
    "default_registry",
    "parse_hardware",
    "parse_input_shapes",
]
