"""A candidate of the search: its configuration (per-layer choices), its key, and what evaluating it measured."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from nnopt.search.objectives import OBJECTIVES

#: A candidate's configuration: parameter name -> chosen value, e.g. ``{"conv1/prune": 0.25,
#: "conv1/weights": "k4", "fc1/rank": 0.5}``. Values are JSON scalars (str, int, float, bool, None);
#: a parameter left out takes its space's "no change" value.
Configuration = dict[str, Any]


def config_key(config: Configuration) -> str:
    """A stable 16-hex-digit key of a configuration: equal configurations (in any key order) share it."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CandidateResult:
    """What evaluating one configuration measured: plain data, so it crosses process and machine boundaries.

    Attributes:
        key: ``config_key(config)``.
        config: the configuration evaluated.
        metric: the metric on the evaluation data (higher is better); None when the candidate failed.
        drop: how far ``metric`` fell below the original model's (absolute or relative, as the search was
            told); None when the candidate failed.
        size_bytes: the serialised model's size.
        flops: floating-point and integer operations of one inference (nnopt's cost model).
        latency_s: the cost model's estimated latency of one inference.
        distortion: 1 - cosine similarity of the candidate's outputs to the original's on the evaluation
            data: a smooth measure of damage where the metric (top-1) moves in whole samples.
        error: one line saying why the candidate failed (it crashed, gave NaN, ...), else None.
        seconds: wall time of the evaluation.
        measured_latency_s: onnxruntime latency, measured later for the candidates that need it.
        energy_j: the cost model's estimated energy of one inference (``nnopt.cost.energy``); None in results
            stored before it was recorded.
    """

    key: str
    config: Configuration
    metric: float | None
    drop: float | None
    size_bytes: int | None = None
    flops: float | None = None
    latency_s: float | None = None
    distortion: float | None = None
    error: str | None = None
    seconds: float = 0.0
    measured_latency_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    energy_j: float | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.metric is None or not math.isfinite(self.metric)

    @property
    def drop_bound(self) -> float | None:
        """The drop plus its sampling margin (``extra["drop_bound"]``, see ``nnopt.search.evaluate``): what
        feasibility is judged on, so that a candidate whose flips happened to cancel out on the evaluation
        samples is not taken for one that changes nothing. Without a margin, the drop itself."""
        bound = self.extra.get("drop_bound")
        return float(bound) if bound is not None else self.drop

    def feasible(self, max_drop: float) -> bool:
        """Evaluated without failing and within the accuracy drop allowed (its drop plus margin)."""
        bound = self.drop_bound
        return not self.failed and bound is not None and bound <= max_drop + 1e-12

    def objective(self, name: str) -> float:
        """The value minimised for ``--objective name`` (a key of ``nnopt.search.objectives.OBJECTIVES``); inf
        when unknown."""
        value = OBJECTIVES[name].value(self)
        return float(value) if value is not None else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateResult:
        return cls(**data)
