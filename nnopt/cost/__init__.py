"""Cost model: static params/MACs/FLOPs/bytes with a roofline latency estimate, and measured latency."""

from __future__ import annotations

from nnopt.cost.analysis import CostReport, analyze, parse_input_shapes
from nnopt.cost.hardware import BUILTIN_PROFILES, DEFAULT_PROFILE, HardwareProfile, parse_hardware
from nnopt.cost.rules import (
    Cost,
    CostContext,
    CostRule,
    CostRuleRegistry,
    TensorInfo,
    UnknownShapeError,
    builtin_cost_rules,
    default_registry,
)

__all__ = [
    "BUILTIN_PROFILES",
    "DEFAULT_PROFILE",
    "Cost",
    "CostContext",
    "CostReport",
    "CostRule",
    "CostRuleRegistry",
    "HardwareProfile",
    "TensorInfo",
    "UnknownShapeError",
    "analyze",
    "builtin_cost_rules",
    "default_registry",
    "parse_hardware",
    "parse_input_shapes",
]
