"""hashed-sharing: post-training HashedNets; a layer's weights share K values chosen by a seeded hash of their
position, which the graph recomputes, so the file keeps only the K values and a few integers."""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnopt.analysis.refit import MIN_REFIT_SAMPLES
from nnopt.analysis.selection import NodeSelection
from nnopt.errors import OptionError
from nnopt.ir.model import Model, replace_tensor
from nnopt.ir.naming import taken_names
from nnopt.ir.walk import all_graphs, graph_outputs, is_onnx_op
from nnopt.passes import _hashed_fit, _kmeans_refit
from nnopt.passes._decoder import DecoderBuilder, stored_bytes
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassResult

#: The hash is h(pos) = ((pos · A + B) mod P) mod K, in int64 both in numpy and in the graph (ONNX Mul, Add,
#: Mod with fmod=0, which for non-negative operands is numpy's %). P is the Mersenne prime 2^31 − 1 and
#: B < P, so pos · A + B < 2^63 for every position below 2^32: nothing overflows. A is fixed (odd, < P); the
#: layer's seed is B. The sign hash uses its own A and B, and takes the result mod 2.
PRIME = 2**31 - 1
MULTIPLIER = 1_103_515_245
SIGN_MULTIPLIER = 1_500_450_271
#: Positions must stay below this for pos · A + B to fit in int64.
MAX_ELEMENTS = 2**32
#: Range (opset 11) and Mod (opset 10) build the positions and the hash.
MIN_OPSET = 11
#: Op type → the input index of the weight it multiplies (Gemm's and MatMul's B).
WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass(frozen=True)
class HashedOptions(NodeSelection):
    HELP: ClassVar[Mapping[str, str]] = {
        "nodes": "only weights whose readers all match these (shell patterns; default all)",
        "exclude": "never weights read by a node matching these (shell patterns)",
    }

    k: int = field(default=0, metadata={"help": "shared values per layer; 0: ratio × the layer's elements"})
    ratio: float = field(
        default=0.125,
        metadata={"help": "K as a fraction of the layer's elements when k=0 (HashedNets' compression factor "
                          "is 1/ratio); post-training, anything far below 1 costs most of the accuracy (see "
                          "docs/hashed_sharing.md)"},
    )
    sign: bool = field(
        default=True,
        metadata={"help": "multiply each weight by a second hash's ±1 (HashedNets' sign hash), so the values "
                          "that share a bucket do not all pull it the same way"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "the hash's seed; none: derived from the pipeline's --seed (each layer its own)"},
    )
    min_size: int = field(default=1024, metadata={"help": "leave weights with fewer elements than this alone"})

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise OptionError(f"hashed-sharing: k must be a non-negative integer, got {self.k!r}")
        if not 0 < self.ratio < 1:
            raise OptionError(f"hashed-sharing: ratio must be between 0 and 1 (exclusive), got {self.ratio!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 1:
            raise OptionError(f"hashed-sharing: min_size must be a positive integer, got {self.min_size!r}")


def bucket_hash(n: int, k: int, offset: int) -> np.ndarray:
    """The bucket of each of the positions 0..n-1, as the graph computes it (int64)."""
    return ((np.arange(n, dtype=np.int64) * MULTIPLIER + offset) % PRIME) % k


def sign_hash(n: int, offset: int) -> np.ndarray:
    """The ±1 of each of the positions 0..n-1 (float64), as the graph computes it: 1 − 2 · (hash mod 2)."""
    bit = ((np.arange(n, dtype=np.int64) * SIGN_MULTIPLIER + offset) % PRIME) % 2
    return 1.0 - 2.0 * bit


class _Decline(Exception):
    """Raised inside the pass (never escapes it) with the reason a weight stays as it is."""


@dataclass
class _Weight:
    """One weight tensor to share and the nodes that read it."""

    tensor: gs.Constant
    readers: list[gs.Node]
    label: str
    op_type: str
    figures: dict[str, Figure] = field(default_factory=dict)


def _fitted_to_data(fit: Figure) -> bool:
    """Whether a layer's ``fit`` figure says its values were fitted to the data (a dict), not the weights."""
    return isinstance(fit, Mapping) and fit.get("fit") == "data"


class HashedSharing(Pass[HashedOptions]):
    """Share each layer's weights among K values picked by a seeded hash of their position (HashedNets).

    Matches: constant float initializers read as the weight of Conv, ConvTranspose, Gemm (B) or MatMul (B)
    in the main graph, of at least ``min_size`` elements, whose readers are all selected; the model's opset
    must be at least 11. Declined with a reason: non-constant or non-float weights, weights read from a
    subgraph or that are graph outputs, K not below the element count, no saving.

    Rewrites a weight W of shape S and n elements into K stored values and the hash that places them::

        Conv(X, W)  →  Conv(X, Gather(values [K], idx) · Cast(Gather([1, -1] int8, bit)))
        pos = Reshape(Range(0, n, 1), S)                      int64
        idx = Mod(Mod(Add(Mul(pos, A), B), P), K)             bucket of each position
        bit = Mod(Mod(Add(Mul(pos, A'), B'), P), 2)           sign hash (sign=true)

    Only the values, the integers A, B, P, K (and A', B') and S are stored: the file shrinks to about K
    floats per layer. onnxruntime folds the decoder into a plain weight when it creates a session with graph
    optimisations on, so inference costs what the original model's does (docs/hashed_sharing.md measures it).

    Lossy: the values are the least-squares fit to the weights (per bucket the mean of the signed weights);
    with ``--data`` (at least 4 samples, 4 rows of data per value) and K ≤ 512 they are fitted instead to the
    layer's outputs on the data (ridge least squares, kept where held-out samples' output error drops).
    Deterministic for a seed.
    Without retraining the hash mixes unrelated weights: see the docs for what that costs and for ``distill``.
    """

    name = "hashed-sharing"
    lossy = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        weights = self._collect(model)
        fits = self._plan_data_fits(model, weights, opts, ctx)
        taken = taken_names(model)
        outputs = graph_outputs(model)
        scope = all_graphs(model.graph)
        layers: list[LayerDecision] = []
        inserts: dict[int, list[gs.Node]] = {}
        positions = {id(node): i for i, node in enumerate(model.graph.nodes)}
        started = time.perf_counter()
        for done, weight in enumerate(weights, start=1):
            ctx.progress(done - 1, len(weights), weight.label)
            try:
                nodes = self._rewrite(model, weight, opts, ctx, taken, outputs, scope, fits.get(id(weight.tensor)))
            except _Decline as why:
                layers.append(LayerDecision(weight.label, weight.op_type, "declined", str(why), weight.figures))
                continue
            layers.append(LayerDecision(weight.label, weight.op_type, "rewritten", figures=weight.figures))
            first = min(weight.readers, key=lambda node: positions[id(node)])
            inserts.setdefault(id(first), []).extend(nodes)
        if inserts:
            # Decoders read constants only: placed before the first reader, the graph stays sorted.
            model.graph.nodes = [n for node in model.graph.nodes for n in (*inserts.get(id(node), []), node)]
        rewritten = [entry for entry in layers if entry.action == "rewritten"]
        before = sum(entry.int_figure("bytes_before") for entry in rewritten)
        after = sum(entry.int_figure("bytes_after") for entry in rewritten)
        fitted = [e for e in rewritten if _fitted_to_data(e.figures.get("fit"))]
        stats: dict[str, Figure] = {
            "weights_rewritten": len(rewritten),
            "weights_declined": len(layers) - len(rewritten),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_bytes_saved": before - after,
            "layers_fit_to_data": len(fitted),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if self._fit_note:
            stats["fit"] = self._fit_note
        return PassResult(modified=bool(rewritten), stats=stats, layers=layers)

    # ------------------------------------------------------------------------------------------ selection
    def _collect(self, model: Model) -> list[_Weight]:
        """Every tensor read as a Conv/ConvTranspose/Gemm/MatMul weight in the main graph, once, in order."""
        found: dict[int, _Weight] = {}
        for node in model.graph.nodes:
            slot = WEIGHT_SLOTS.get(node.op) if is_onnx_op(node) else None
            if slot is None or len(node.inputs) <= slot:
                continue
            tensor = node.inputs[slot]
            if id(tensor) not in found:
                readers = list({id(n): n for n in tensor.outputs}.values())
                label = node.name or (node.outputs[0].name if node.outputs else node.op)
                found[id(tensor)] = _Weight(tensor, readers, label, node.op, {"tensor": tensor.name})
        return list(found.values())

    def _check(self, model: Model, weight: _Weight, opts: HashedOptions, outputs: set[int]) -> tuple[np.ndarray, int]:
        """The weight's values and K, or the reason to leave it alone."""
        if not isinstance(weight.tensor, gs.Constant):
            producer = weight.tensor.inputs[0] if weight.tensor.inputs else None
            if producer is not None and producer.op == "Constant":
                raise _Decline("weight is a Constant node's output (constants-to-initializers makes it an initializer)")
            raise _Decline("weight is not a constant (a graph input, or computed)")
        values = np.asarray(weight.tensor.values)
        if values.dtype not in (np.float16, np.float32, np.float64):
            raise _Decline(f"weight is {values.dtype}, not float16/32/64")
        n = values.size
        if n < opts.min_size:
            raise _Decline(f"{n} elements, below min_size={opts.min_size}")
        if n >= MAX_ELEMENTS:
            raise _Decline(f"{n} elements: positions must stay below 2^32 for the int64 hash")
        if model.opset < MIN_OPSET:
            raise _Decline(f"the hash needs Range (opset >= {MIN_OPSET}); the model has opset {model.opset}")
        unselected = [r for r in weight.readers if not opts.selects(r.name or "")]
        if unselected:
            raise _Decline(f"also read by unselected node {unselected[0].name or unselected[0].op}")
        graph_nodes = {id(n) for n in model.graph.nodes}
        if any(id(r) not in graph_nodes for r in weight.readers):
            raise _Decline("read from a subgraph")
        if id(weight.tensor) in outputs:
            raise _Decline("weight is a graph output")
        if not np.all(np.isfinite(values)):
            raise _Decline("weight has NaN or infinite values")
        k = opts.k or max(1, round(opts.ratio * n))
        if k >= n:
            raise _Decline(f"k={k} is not below the weight's {n} elements")
        return values, k

    # ------------------------------------------------------------------------------------------ data fit
    _fit_note = ""

    def _plan_data_fits(self, model: Model, weights: list[_Weight], opts: HashedOptions, ctx: PassContext,
                        ) -> dict[int, tuple[_kmeans_refit.Layer, list[np.ndarray], list[np.ndarray]]]:
        """Per weight (by tensor id) its layer and the layer's input and output rows on the data, for the
        layers a data fit can serve (one run of the unchanged model per sample); empty without data."""
        self._fit_note = ""
        if not ctx.samples:
            return {}
        if len(ctx.samples) < MIN_REFIT_SAMPLES:
            self._fit_note = f"fit to the weights: {len(ctx.samples)} samples, fewer than {MIN_REFIT_SAMPLES}"
            return {}
        layers: dict[int, _kmeans_refit.Layer] = {}
        for weight in weights:
            values = weight.tensor.values if isinstance(weight.tensor, gs.Constant) else None
            if values is None or np.size(values) < opts.min_size or weight.readers[0].inputs[1] is not weight.tensor:
                continue
            k = opts.k or max(1, round(opts.ratio * np.size(values)))
            if k > _hashed_fit.MAX_FIT_VALUES:
                weight.figures["fit"] = f"weights: k={k} > {_hashed_fit.MAX_FIT_VALUES} values for a data fit"
                continue
            found = _kmeans_refit.plan(weight.readers[0], np.asarray(values), len(weight.readers))
            if isinstance(found, str):
                weight.figures["fit"] = f"weights: {found}"
            else:
                layers[id(weight.tensor)] = found
        return _kmeans_refit.collect_planned(model, layers, ctx.samples, ctx.seed_for(f"{self.name}:fit"))

    # ------------------------------------------------------------------------------------------ rewriting
    def _offsets(self, name: str, ctx: PassContext) -> tuple[int, int]:
        """The layer's B and B' (each in [0, P)): from the ``seed`` option, or else the pipeline's seed."""
        seed = self.options.seed
        if seed is None:
            return ctx.seed_for(f"{self.name}:{name}"), ctx.seed_for(f"{self.name}:sign:{name}")
        b, b_sign = np.random.default_rng([seed, zlib.crc32(name.encode())]).integers(0, PRIME, size=2)
        return int(b), int(b_sign)

    def _rewrite(self, model: Model, weight: _Weight, opts: HashedOptions, ctx: PassContext, taken: set[str],
                 outputs: set[int], scope: list[gs.Graph],
                 fit: tuple[_kmeans_refit.Layer, list[np.ndarray], list[np.ndarray]] | None) -> list[gs.Node]:
        """Fit one weight's K values, build its decoder and point its readers at it; the decoder's nodes."""
        values, k = self._check(model, weight, opts, outputs)
        n, dtype, shape = values.size, values.dtype, values.shape
        offset, sign_offset = self._offsets(weight.tensor.name, ctx)
        buckets = bucket_hash(n, k, offset)
        signs = sign_hash(n, sign_offset) if opts.sign else np.ones(n)
        flat = values.reshape(-1)
        shared = _hashed_fit.weight_fit(flat, buckets, signs, k)
        if fit is not None:
            layer, xs, ys = fit
            shared, figures = _hashed_fit.data_fit(layer, buckets.reshape(shape), signs.reshape(shape), shared,
                                                   xs, ys, ctx.seed_for(f"{self.name}:fit:{weight.tensor.name}"))
            weight.figures["fit"] = figures
        stored = shared.astype(dtype)
        decoded = stored.astype(np.float64)[buckets] * signs
        ref = flat.astype(np.float64)
        norm = float(np.linalg.norm(ref))
        error = float(np.linalg.norm(ref - decoded)) / norm if norm > 0 else 0.0

        b = DecoderBuilder("hashed", weight.tensor.name or "weight", taken)
        int64 = np.int64

        def scalar(what: str, value: int) -> gs.Constant:
            return b.const(what, np.array(value, dtype=int64))

        positions = b.op("Range", [scalar("start", 0), scalar("limit", n), scalar("delta", 1)], int64, (n,))
        positions = b.op("Reshape", [positions, b.const("shape", np.array(shape, dtype=int64))], int64, shape)
        prime = scalar("prime", PRIME)

        def hashed(what: str, multiplier: int, add: int, modulus: int) -> gs.Variable:
            mixed = b.op("Mul", [positions, scalar(f"{what}_multiplier", multiplier)], int64, shape)
            mixed = b.op("Add", [mixed, scalar(f"{what}_seed", add)], int64, shape)
            mixed = b.op("Mod", [mixed, prime], int64, shape)
            return b.op("Mod", [mixed, scalar(f"{what}_modulus", modulus)], int64, shape)

        weight_out = b.op("Gather", [b.const("values", stored), hashed("bucket", MULTIPLIER, offset, k)], dtype, shape)
        if opts.sign:
            # NOTE: an int8 table, not a float one: distill trains float tables read by Gather, and the
            # signs must stay ±1 (the values are what training may move).
            sign = b.op("Gather", [b.const("signs", np.array([1, -1], dtype=np.int8)),
                                   hashed("sign", SIGN_MULTIPLIER, sign_offset, 2)], np.int8, shape)
            sign = b.op("Cast", [sign], dtype, shape, to=int(onnx.helper.np_dtype_to_tensor_dtype(dtype)))
            weight_out = b.op("Mul", [weight_out, sign], dtype, shape)
        bytes_before = n * dtype.itemsize
        bytes_after = sum(stored_bytes(c) for c in b.constants)
        weight.figures.update({
            "k": int(k),
            "elements": int(n),
            "sign": opts.sign,
            "seed": int(offset),
            **({"sign_seed": int(sign_offset)} if opts.sign else {}),
            "rel_error": float(f"{error:.6g}"),
            "buckets_empty": int(k - np.unique(buckets).size),
            "bytes_before": int(bytes_before),
            "bytes_after": int(bytes_after),
        })
        if bytes_after >= bytes_before:
            raise _Decline(f"values and hash constants ({bytes_after} bytes) would not be smaller than the weight "
                           f"({bytes_before})")
        replace_tensor(model.graph, weight.tensor, weight_out, graphs=scope)
        return b.nodes

