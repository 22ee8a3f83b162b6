"""The metrics a search scores candidates with: built-ins, plugins' (``nnopt_register_metrics``) and MODULE:FUNCTION.

A metric is a function ``(outputs, data) -> float``, higher is better: ``outputs`` maps each model output
name to its values stacked over the evaluation samples, ``data`` maps each input name to the stacked
inputs, plus the labels (``--labels KEY``) when the file has them. The built-ins also see the original
model's outputs (``reference``): agreement and cosine compare a candidate with the model it came from.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnopt.errors import InputError, first_line

Arrays = Mapping[str, np.ndarray]
#: A user's or a plugin's metric: ``(outputs, data) -> float``, higher is better.
MetricFunction = Callable[[Arrays, Arrays], float]
DEFAULT_LABELS_KEY = "labels"


@dataclass(frozen=True)
class Metric:
    """A named metric. ``score(outputs, data, reference)`` is what the search calls.

    Attributes:
        name: as given on the command line (``top1``, ``agreement``, ``cosine``, a plugin's name, or
            ``module:function``).
        function: ``(outputs, data, reference) -> float``.
        labels_key: the data array holding class labels, when the metric needs them (else None).
    """

    name: str
    function: Callable[[Arrays, Arrays, Arrays], float]
    labels_key: str | None = None

    def score(self, outputs: Arrays, data: Arrays, reference: Arrays) -> float:
        """The metric's value; a non-finite value or a non-number is a ``ValueError``."""
        value = self.function(outputs, data, reference)
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
            raise ValueError(f"metric {self.name} returned {type(value).__name__}, not a number")
        if not math.isfinite(float(value)):
            raise ValueError(f"metric {self.name} returned {float(value)}")
        return float(value)


def first_output(outputs: Arrays) -> np.ndarray:
    """The model's first output (outputs keep the model's order)."""
    return np.asarray(next(iter(outputs.values())))


def class_scores(array: np.ndarray) -> np.ndarray:
    """``array`` as [samples, classes]: a batch of score vectors (trailing size-1 axes dropped)."""
    scores = np.asarray(array, dtype=np.float64)
    while scores.ndim > 2 and scores.shape[-1] == 1:
        scores = scores[..., 0]
    return scores.reshape(scores.shape[0], -1)


def looks_like_class_scores(outputs: Arrays) -> bool:
    """Whether the first output is a float [samples, classes >= 2] array: then agreement is the default."""
    first = first_output(outputs)
    return first.dtype.kind == "f" and first.ndim >= 2 and class_scores(first).shape[1] >= 2 and (
        first.ndim == 2 or all(d == 1 for d in first.shape[2:])
    )


def _top1(labels_key: str) -> Callable[[Arrays, Arrays, Arrays], float]:
    def top1(outputs: Arrays, data: Arrays, reference: Arrays) -> float:
        predicted = class_scores(first_output(outputs)).argmax(axis=1)
        return float((predicted == np.asarray(data[labels_key]).reshape(-1)).mean())

    return top1


def _agreement(outputs: Arrays, data: Arrays, reference: Arrays) -> float:
    """Fraction of samples whose top-1 class is the original model's."""
    got = class_scores(first_output(outputs)).argmax(axis=1)
    want = class_scores(first_output(reference)).argmax(axis=1)
    return float((got == want).mean())


def _cosine(outputs: Arrays, data: Arrays, reference: Arrays) -> float:
    """Mean over samples and outputs of the cosine similarity to the original's outputs (1 = same direction)."""
    values = []
    for name, ref in reference.items():
        a = np.asarray(outputs[name], dtype=np.float64).reshape(len(ref), -1)
        b = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        same = np.all(a == b, axis=1)  # zero vectors equal to the reference count as identical
        cos = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
        values.append(np.where(same, 1.0, cos))
    return float(np.mean(np.concatenate(values))) if values else 1.0


def _user(name: str, function: MetricFunction) -> Callable[[Arrays, Arrays, Arrays], float]:
    def call(outputs: Arrays, data: Arrays, reference: Arrays) -> float:
        return function(outputs, data)

    call.__name__ = name
    return call


#: The built-in metrics: name -> (function, needs labels).
BUILTIN_METRICS: dict[str, tuple[Callable[[Arrays, Arrays, Arrays], float] | None, bool]] = {
    "top1": (None, True),  # built per labels key
    "agreement": (_agreement, False),
    "cosine": (_cosine, False),
}


def resolve_metric(spec: str | None, *, plugin_metrics: Mapping[str, MetricFunction] | None = None,
                   labels_key: str = DEFAULT_LABELS_KEY, reference: Arrays | None = None) -> Metric:
    """The metric ``spec`` names; None picks agreement for class-score outputs, cosine otherwise.

    Raises:
        InputError: an unknown name, a MODULE:FUNCTION that cannot be imported or is not callable.
    """
    if spec is None:
        if reference is None:
            raise InputError("no metric given and no outputs to choose one from")
        spec = "agreement" if looks_like_class_scores(reference) else "cosine"
    if spec in BUILTIN_METRICS:
        function, needs_labels = BUILTIN_METRICS[spec]
        if needs_labels:
            return Metric(spec, _top1(labels_key), labels_key)
        assert function is not None
        return Metric(spec, function)
    plugin_metrics = plugin_metrics or {}
    if spec in plugin_metrics:
        return Metric(spec, _user(spec, plugin_metrics[spec]))
    if ":" in spec:
        return Metric(spec, _user(spec, _import_function(spec)))
    known = sorted([*BUILTIN_METRICS, *plugin_metrics])
    raise InputError(f"--metric {spec}: unknown metric (known: {', '.join(known)}, or MODULE:FUNCTION)")


def _import_function(spec: str) -> MetricFunction:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # boundary: the user's module may fail to import in any way
        raise InputError(f"--metric {spec}: cannot import {module_name}: {first_line(exc)}") from None
    function: Any = module
    for part in attr.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise InputError(f"--metric {spec}: {module_name} has no function {attr}")
    return function
