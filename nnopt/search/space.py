"""The search space: per-layer choices of each technique, and the pass pipeline a configuration stands for.

A layer is a Conv, Gemm or MatMul with a constant weight in the (losslessly cleaned) model. Each layer
has up to three parameters, named ``"LAYER/TECHNIQUE"``:

- ``prune``: fraction of its output channels removed (structured pruning with reconstruction);
- ``rank``: fraction of its full rank kept by a truncated SVD (low-rank factorisation);
- ``weights``: how its weights are stored and computed: ``float``, ``int8`` (static int8 with activations),
  or ``k8``..``k2`` (k-means weight sharing, 2^bits shared values per output channel).

The first choice of every parameter changes nothing, so a configuration that leaves a parameter out and
one that gives its first choice are the same candidate (``normalise``). The pipeline a configuration
stands for is made of ordinary passes with ``nodes=`` selections, in the order that lets each technique
find its layers: prune (node names unchanged), svd (each layer becomes ``svd/LAYER/first`` and
``svd/LAYER/second``), distill, kmeans, quantize.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from nnopt.search.candidate import Configuration

#: Fractions of output channels removed; fractions of the full rank kept; weight formats.
PRUNE_CHOICES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
RANK_CHOICES: tuple[float | None, ...] = (None, 0.5, 0.25, 0.125)
WEIGHT_CHOICES: tuple[str, ...] = ("float", "int8", "k8", "k4", "k3", "k2")
LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: Layers smaller than this (weight elements) are left alone: nothing to gain, and k-means needs values.
MIN_LAYER_WEIGHTS = 64
#: The smallest rank a factorisation is worth trying at (below it, the rank choices collapse).
MIN_RANK = 4
#: distill inside the search: bounded by epochs only, so that a candidate is the same on a slow machine or a
#: busy worker (a time limit would cut training at a different step).
DISTILL_OPTIONS = {"epochs": 10, "max_seconds": 86400.0}
#: Techniques a level may search: level 1 int8 only; level 2 and 3 everything.
TECHNIQUES = ("prune", "rank", "weights")


@dataclass(frozen=True)
class Layer:
    """A layer the search may change: its node name, op, weight shape and which outputs it may prune."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    prunable: bool

    @property
    def full_rank(self) -> int:
        """The rank of the weight as a matrix [outputs, everything else] (svd's view of it)."""
        if self.op == "Conv":
            return min(self.weight_shape[0], int(np.prod(self.weight_shape[1:])))
        return min(self.weight_shape[-2:]) if len(self.weight_shape) >= 2 else 1


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of a search: name -> choices (the first changes nothing), and its layers."""

    layers: tuple[Layer, ...]
    params: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    distill: bool = False  # whether a trailing ``distill`` parameter is searched (level 3, torch installed)

    def normalise(self, config: Configuration) -> Configuration:
        """``config`` without parameters at their no-change value, unknown names refused."""
        out: Configuration = {}
        for name, value in config.items():
            if name not in self.params:
                raise KeyError(f"unknown search parameter {name!r}")
            if value not in self.params[name]:
                raise ValueError(f"{name}: {value!r} is not one of {self.params[name]}")
            if value != self.params[name][0]:
                out[name] = value
        return dict(sorted(out.items()))

    def pipeline(self, config: Configuration) -> list[tuple[str, dict[str, Any]]]:
        """The passes (name, options) that make the candidate ``config`` stands for from the base model.

        The configuration decides every layer itself, so the passes' own latency checks are off
        (``quantize:select=all``, ``svd:min_latency_saving=none``): a layer the search sets to int8 or a rank
        is int8 or factored, and the search measures whether that paid.
        """
        by_name = {layer.name: layer for layer in self.layers}
        choice = {name: config.get(name, choices[0]) for name, choices in self.params.items()}
        passes: list[tuple[str, dict[str, Any]]] = []
        prune: dict[float, list[str]] = {}
        for layer in self.layers:
            ratio = choice.get(f"{layer.name}/prune", 0.0)
            if ratio:
                prune.setdefault(ratio, []).append(_pattern(layer.name))
        passes += [("prune", {"ratio": r, "nodes": names}) for r, names in sorted(prune.items())]
        factored: set[str] = set()
        for layer in self.layers:
            fraction = choice.get(f"{layer.name}/rank")
            if fraction is not None:
                rank = max(1, round(fraction * by_name[layer.name].full_rank))
                passes.append(("svd", {"rank": rank, "nodes": [_pattern(layer.name)], "min_param_saving": 0.0,
                                       "min_latency_saving": None}))
                factored.add(layer.name)
        if choice.get("distill"):
            passes.append(("distill", dict(DISTILL_OPTIONS)))
        kmeans: dict[int, list[str]] = {}
        floats: list[str] = []
        any_int8 = False
        for layer in self.layers:
            fmt = choice.get(f"{layer.name}/weights", "float")
            names = _patterns(layer.name, layer.name in factored)
            if fmt == "int8":
                any_int8 = True
                continue
            floats += names
            if fmt.startswith("k"):
                kmeans.setdefault(int(fmt[1:]), []).extend(names)
        passes += [("kmeans", {"bits": b, "per_channel": True, "nodes": n}) for b, n in sorted(kmeans.items(),
                                                                                                reverse=True)]
        if any_int8:
            passes.append(("quantize", {"exclude": floats, "select": "all"}))
        return passes

    def decisions(self, config: Configuration) -> list[dict[str, Any]]:
        """Per layer and technique, the choice ``config`` makes (no-change choices included)."""
        rows = []
        for layer in self.layers:
            for technique in TECHNIQUES:
                name = f"{layer.name}/{technique}"
                if name in self.params:
                    rows.append({"layer": layer.name, "op": layer.op, "technique": technique,
                                 "choice": config.get(name, self.params[name][0])})
        return rows


def _pattern(name: str) -> str:
    """A shell pattern matching exactly ``name`` (node names may hold ``[``, ``*`` or ``?``)."""
    return glob.escape(name)


def _patterns(name: str, factored: bool) -> list[str]:
    """The patterns of a layer's nodes: itself, or the two factors svd made of it."""
    if not factored:
        return [_pattern(name)]
    return [_pattern(f"svd/{name}/first"), _pattern(f"svd/{name}/second")]


def find_layers(proto: onnx.ModelProto) -> list[Layer]:
    """The Conv/Gemm/MatMul nodes of the main graph with a constant weight of at least ``MIN_LAYER_WEIGHTS``."""
    inits = {t.name: t for t in proto.graph.initializer}
    head = _output_layers(proto)
    layers = []
    seen: set[str] = set()
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if not node.name or node.name in seen:
            continue  # a layer needs a unique name to be selected by
        seen.add(node.name)
        shape = tuple(int(d) for d in inits[node.input[1]].dims)
        if int(np.prod(shape)) < MIN_LAYER_WEIGHTS or len(shape) < 2:
            continue
        layers.append(Layer(node.name, node.op_type, shape, prunable=node.name not in head))
    return layers


def _output_layers(proto: onnx.ModelProto) -> set[str]:
    """Layers whose output channels are the model's (reaching a graph output through no other layer)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found: set[str] = set()
    stack = [o.name for o in proto.graph.output]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or tensor in seen:
            continue
        seen.add(tensor)
        if node.op_type in LAYER_OPS:
            found.add(node.name)
            continue
        stack.extend(node.input)
    return found


def build_space(proto: onnx.ModelProto, techniques: Sequence[str], *, distill: bool = False) -> SearchSpace:
    """The parameters of ``techniques`` for every layer of ``proto`` where they can change something."""
    layers = find_layers(proto)
    params: dict[str, tuple[Any, ...]] = {}
    for layer in layers:
        if "prune" in techniques and layer.prunable:
            params[f"{layer.name}/prune"] = PRUNE_CHOICES
        if "rank" in techniques and layer.full_rank >= 2 * MIN_RANK:
            ranks = tuple(f for f in RANK_CHOICES if f is None or round(f * layer.full_rank) >= MIN_RANK)
            if len(ranks) > 1:
                params[f"{layer.name}/rank"] = ranks
        if "weights" in techniques:
            params[f"{layer.name}/weights"] = WEIGHT_CHOICES
        elif "int8" in techniques:
            params[f"{layer.name}/weights"] = ("float", "int8")
    if distill:
        params["distill"] = (False, True)
    return SearchSpace(tuple(layers), params, distill)

