"""kmeans: share each weight tensor's values among 2^bits k-means centroids, stored as codebook plus indices."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnopt.analysis.refit import MIN_REFIT_SAMPLES
from nnopt.analysis.selection import NodeSelection
from nnopt.errors import OptionError
from nnopt.ir.constants import constant_node_payload, constant_values
from nnopt.ir.model import Model, replace_tensor
from nnopt.ir.naming import taken_names
from nnopt.ir.walk import all_graphs, graph_outputs, is_onnx_op
from nnopt.passes import _kmeans_refit, _ternary
from nnopt.passes._decoder import DecoderBuilder, stored_bytes
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassResult

_PREFIX = "kmeans"

#: k-means runs (k-means++ seedings) per clustering; the lowest inertia wins. On the weights of the real
#: models measured, three runs instead of one lower the weight error by 0.1-2 % at 2-3× the time.
N_INIT = 1
#: Points k-means sees: a tensor with more distinct values than min(MAX_BINS, max(MIN_BINS,
#: HISTOGRAM_BUDGET // k)) is clustered on that many uniform bins of its value range (each bin a point at
#: the mean of its values, weighted by its count), otherwise on its distinct values weighted by their
#: counts. On ddddocr's detector 16,384 bins instead of 65,536 cost 0.3 % more weight error at 4 bits and
#: run 2-3× faster.
HISTOGRAM_BUDGET = 1 << 20
MAX_BINS = 1 << 14
MIN_BINS = 1 << 12
#: Elements per block when mapping a large tensor to its clusters, to bound the temporary memory.
_BLOCK = 1 << 22

#: Weight dtypes the pass shares (bfloat16 and float8 have no numpy dtype to cluster in).
_FLOAT_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


@dataclass(frozen=True)
class KMeansOptions(NodeSelection):
    HELP: ClassVar[Mapping[str, str]] = {
        "nodes": "only weights whose readers all match these (shell patterns; default all)",
        "exclude": "never weights read by a node matching these (shell patterns)",
    }

    mode: Literal["kmeans", "binary", "ternary"] = field(
        default="kmeans",
        metadata={"help": "what the codebook holds: kmeans (2^bits k-means centroids), binary (sign(W) x alpha, "
                          "alpha = mean|W|, 1-bit indices; BinaryConnect/XNOR) or ternary ({-alpha, 0, +alpha}: "
                          "0 where |W| <= threshold x mean|W|, alpha = mean|W| above it, 2-bit indices; TWN); "
                          "alpha per tensor, or per output channel with per_channel (see docs/ternary.md)"},
    )
    bits: int | None = field(
        default=None,
        metadata={"help": "index width: k = 2^bits shared values per codebook (1-8); none: 8 for mode=kmeans, "
                          "1 for binary, 2 for ternary (the only widths those modes take). 8 kept the outputs of "
                          "the real models measured at cosine >= 0.9997 for a quarter of the size; 4 and below "
                          "trade accuracy for size (see docs/kmeans.md)"},
    )
    threshold: float | None = field(
        default=None,
        metadata={"help": "mode=ternary only: weights with |W| <= threshold x mean|W| (of their tensor or channel) "
                          "become 0; none: TWN's 0.7"},
    )
    per_channel: bool = field(
        default=False,
        metadata={"help": "one codebook per output channel (Conv axis 0, ConvTranspose axis 1, Gemm axis 0 "
                          "with transB else 1, MatMul last axis; other initializers axis 0) instead of one per "
                          "tensor"},
    )
    min_size: int = field(default=1024, metadata={"help": "leave tensors with fewer elements than this alone"})
    all_initializers: bool = field(
        default=False,
        metadata={"help": "also share any other floating-point constant of at least min_size elements (LSTM "
                          "weights, embedding tables, ...), not only Conv/ConvTranspose/Gemm/MatMul weights"},
    )
    keep_zeros: bool = field(
        default=True,
        metadata={"help": "reserve an exact 0 in the codebook of a tensor (channel) that has zeros, so pruned "
                          "weights stay exactly zero; that leaves 2^bits - 1 shared values for the rest (mode=kmeans; "
                          "ternary always keeps zeros, binary has no zero)"},
    )
    init: Literal["kmeans++", "quantiles"] = field(
        default="kmeans++",
        metadata={"help": "mode=kmeans: where k-means starts: kmeans++ (seeded k-means++, the lowest weight error) or "
                          "quantiles (k evenly spaced quantiles, min and max included, as onnxsim does): keeps a "
                          "centroid on a few extreme weights that k-means++ averages away (ppocr_rec's classifier "
                          "at 4 bits: output cosine 0.59 -> 0.97, see docs/kmeans.md)"},
    )
    storage: Literal["auto", "uint8", "subbyte", "bitpack"] = field(
        default="auto",
        metadata={"help": "how indices are stored: uint8 (1 byte each, any opset); subbyte (ONNX UINT4, or "
                          "UINT2 for bits <= 2 at opset 25; needs the model at opset >= 21); bitpack (bits-wide "
                          "fields in uint8/32/64 words unpacked with BitShift, opset >= 11); auto: the smallest "
                          "that the model's opset allows"},
    )

    refit: Literal["auto", "off"] = field(
        default="auto",
        metadata={"help": "auto: with --data, refit each Conv/Gemm/MatMul weight's centroids (assignments fixed) "
                          "and a bias correction by least squares to the layer's outputs on the data, kept per "
                          "layer only where the output error on held-out samples drops; off (or no --data): "
                          "centroids are the cluster means of the weights"},
    )

    def __post_init__(self) -> None:
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                                      or not 1 <= self.bits <= 8):
            raise OptionError(f"kmeans: bits must be an integer from 1 to 8, got {self.bits!r}")
        fixed = MODE_BITS.get(self.mode)
        if fixed is not None and self.bits not in (None, fixed):
            raise OptionError(f"kmeans: mode={self.mode} stores {fixed}-bit indices; leave bits out, got bits={self.bits}")
        if self.threshold is not None:
            if self.mode != "ternary":
                raise OptionError(f"kmeans: threshold applies to mode=ternary only, not mode={self.mode}")
            if isinstance(self.threshold, bool) or not math.isfinite(self.threshold) or self.threshold < 0:
                raise OptionError(f"kmeans: threshold must be a finite number >= 0, got {self.threshold!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 1:
            raise OptionError(f"kmeans: min_size must be a positive integer, got {self.min_size!r}")


    @property
    def index_bits(self) -> int:
        """The index width in use: ``bits``, or the mode's own width."""
        return self.bits if self.bits is not None else MODE_BITS.get(self.mode, 8)


#: The index width of the modes that have one (binary: 2 values; ternary: 3).
MODE_BITS: dict[str, int] = {"binary": 1, "ternary": 2}


class _Decline(Exception):
    """Raised inside the pass (never escapes it) with the reason a weight stays as it is.

    ``quiet`` declines are not reported: small constants that only ``all_initializers`` looked at.
    """

    def __init__(self, reason: str, quiet: bool = False) -> None:
        super().__init__(reason)
        self.quiet = quiet


# ---------------------------------------------------------------------------------------------- clustering
@dataclass
class Clustering:
    """One codebook and the index of every value into it.

    Attributes:
        codebook: the shared values in float64, ascending; 0.0 first when zeros were reserved (and in ternary
            mode: [0, -α, +α]).
        codes: per input value, its codebook index (uint8).
        exact: whether the tensor had at most k distinct values, so the codebook is those values.
        distinct: distinct values in the input.
    """

    codebook: np.ndarray
    codes: np.ndarray
    exact: bool
    distinct: int


def cluster_values(
    values: np.ndarray, k: int, *, keep_zeros: bool, seed: int, init: str = "kmeans++"
) -> Clustering:
    """Cluster a flat float array into at most ``k`` shared values with k-means (1-D).

    Zeros get their own exact 0 centroid when ``keep_zeros`` (and are left out of the clustering). A tensor
    with at most k distinct values keeps them exactly. Otherwise scikit-learn's KMeans (k-means++,
    ``random_state=seed``) runs on the distinct values weighted by their counts, or, when there are more
    of them than the bin count (see ``HISTOGRAM_BUDGET``), on uniform bins of the value range (bin means
    weighted by bin counts). Each centroid is then replaced by the exact mean of the values assigned to it.
    ``init`` names the starting centroids (a key of ``INITS``).
    """
    zero = values == 0 if keep_zeros else None
    has_zero = bool(zero is not None and zero.any())
    rest = values[~zero] if zero is not None and has_zero else values
    free = k - int(has_zero)
    codes = np.zeros(values.size, dtype=np.uint8)
    if rest.size == 0:
        return Clustering(np.zeros(1), codes, True, 1)
    ordered = np.sort(rest)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    distinct = int(starts.size) + int(has_zero)
    if starts.size <= free:
        centroids = ordered[starts].astype(np.float64)
        rest_codes = np.searchsorted(ordered[starts], rest)
        exact = True
    else:
        centroids, rest_codes = _kmeans_1d(rest, ordered, starts, free, seed, init)
        exact = False
    if zero is not None and has_zero:
        codes[~zero] = rest_codes + 1  # index 0 is the reserved exact zero
        centroids = np.concatenate(([0.0], centroids))
    else:
        codes[:] = rest_codes
    return Clustering(centroids, codes, exact, distinct)


def _kmeans_1d(
    rest: np.ndarray, ordered: np.ndarray, starts: np.ndarray, k: int, seed: int, init: str
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (exact cluster means, ascending) and per-value cluster indices of ``rest``."""
    bins = min(MAX_BINS, max(MIN_BINS, HISTOGRAM_BUDGET // k))
    if starts.size <= bins:
        # Few enough distinct values: cluster them exactly; values map to groups by binary search.
        group_starts = starts
        uniques = ordered[starts]

        def group_of(block: np.ndarray) -> np.ndarray:
            return np.searchsorted(uniques, block)
    else:
        lo = float(ordered[0])
        scale = bins / (float(ordered[-1]) - lo)

        def bin_of(block: np.ndarray) -> np.ndarray:
            # One formula for the sorted and the unsorted values, so both land in the same bins; it is
            # monotone, so the bins of the sorted values are sorted too. float64, so tiny ranges do not
            # overflow the scale.
            return np.minimum(((block.astype(np.float64) - lo) * scale).astype(np.int64), bins - 1)

        sorted_bins = np.concatenate([bin_of(ordered[i:i + _BLOCK]) for i in range(0, ordered.size, _BLOCK)])
        group_starts = np.flatnonzero(np.concatenate(([True], sorted_bins[1:] != sorted_bins[:-1])))
        lut = np.zeros(bins, dtype=np.int64)
        lut[sorted_bins[group_starts]] = np.arange(group_starts.size)

        def group_of(block: np.ndarray) -> np.ndarray:
            return lut[bin_of(block)]

    counts = np.diff(np.append(group_starts, ordered.size)).astype(np.float64)
    sums = np.add.reduceat(ordered, group_starts, dtype=np.float64)
    if group_starts.size <= k:
        labels = np.arange(group_starts.size)
    else:
        labels = _sklearn_kmeans(sums / counts, counts, k, seed, init)
    # Exact means of what each cluster holds, ascending; clusters k-means left empty are dropped.
    size = np.bincount(labels, weights=counts)
    total = np.bincount(labels, weights=sums)
    used = np.flatnonzero(size > 0)
    means = total[used] / size[used]
    order = np.argsort(means, kind="stable")
    rank = np.zeros(size.size, dtype=np.int64)
    rank[used[order]] = np.arange(used.size)
    group_code = rank[labels].astype(np.uint8)
    out = np.empty(rest.size, dtype=np.uint8)
    for begin in range(0, rest.size, _BLOCK):
        out[begin:begin + _BLOCK] = group_code[group_of(rest[begin:begin + _BLOCK])]
    return means[order], out


def _kmeans_pp_start(points: np.ndarray, weights: np.ndarray, k: int) -> str:
    return "k-means++"  # scikit-learn seeds it from random_state


def _quantile_start(points: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """The points holding k evenly spaced weighted quantiles, the first and last point included.

    ``points`` are ascending and more than k. Quantiles that fall on the same point are replaced by unused
    points spread evenly over the rest, so there are always k distinct starting centroids.
    """
    position = np.cumsum(weights)  # the last value each point holds, counting from 1
    targets = np.linspace(0.0, position[-1] - 1.0, k)
    chosen = np.unique(np.searchsorted(position, targets, side="right"))
    if chosen.size < k:
        unused = np.setdiff1d(np.arange(points.size), chosen)
        # Spacing >= 1 between the picks, so rounding keeps them distinct.
        extra = unused[np.round(np.linspace(0, unused.size - 1, k - chosen.size)).astype(np.int64)]
        chosen = np.sort(np.concatenate([chosen, extra]))
    return points[chosen].reshape(-1, 1)


#: Starting centroids by ``init`` option value: scikit-learn's init string or a [k, 1] array.
#: k-means++ reaches the lowest weight error, but a handful of extreme weights are worth less than one
#: centroid to a squared error, so they join the outermost cluster (ppocr_rec's classifier: its two largest
#: weights, 2.45 and 1.37, both of the CTC blank class, decode to 0.36). Quantile starts put a centroid on
#: the minimum and the maximum, and Lloyd's iterations keep it there when the extremes are isolated.
INITS: dict[str, Callable[[np.ndarray, np.ndarray, int], str | np.ndarray]] = {
    "kmeans++": _kmeans_pp_start,
    "quantiles": _quantile_start,
}


def _sklearn_kmeans(points: np.ndarray, weights: np.ndarray, k: int, seed: int, init: str) -> np.ndarray:
    """Cluster labels of 1-D ``points`` (ascending) weighted by ``weights`` (scikit-learn KMeans, Lloyd)."""
    from sklearn.cluster import KMeans  # heavy: imported when a tensor actually needs clustering

    start = INITS[init](points, weights, k)
    model = KMeans(n_clusters=k, init=start, n_init=N_INIT, random_state=seed, algorithm="lloyd")
    with warnings.catch_warnings():
        # Duplicate bin means can leave fewer distinct points than k; the empty clusters are dropped.
        warnings.simplefilter("ignore")
        model.fit(points.reshape(-1, 1), sample_weight=weights)
    return np.asarray(model.labels_, dtype=np.int64)


def _kmeans_codebook(values: np.ndarray, opts: KMeansOptions, seed: int) -> Clustering:
    return cluster_values(values, 1 << opts.index_bits, keep_zeros=opts.keep_zeros, seed=seed, init=opts.init)


def _signed_codebook(values: np.ndarray, found: tuple[np.ndarray, np.ndarray]) -> Clustering:
    """A binary or ternary codebook as a ``Clustering``; exact when it decodes to the values themselves."""
    codebook, codes = found
    exact = bool(np.array_equal(codebook.astype(values.dtype)[codes], values.reshape(-1)))
    return Clustering(codebook, codes, exact, _distinct(values))


def _binary_codebook(values: np.ndarray, opts: KMeansOptions, seed: int) -> Clustering:
    return _signed_codebook(values, _ternary.binary_codes(values))


def _ternary_codebook(values: np.ndarray, opts: KMeansOptions, seed: int) -> Clustering:
    threshold = _ternary.TWN_THRESHOLD if opts.threshold is None else opts.threshold
    return _signed_codebook(values, _ternary.ternary_codes(values, threshold))


#: How one codebook (a tensor's, or a channel's) is found, by ``mode``: (values, options, seed) → clustering.
CODEBOOKS: dict[str, Callable[[np.ndarray, KMeansOptions, int], Clustering]] = {
    "kmeans": _kmeans_codebook,
    "binary": _binary_codebook,
    "ternary": _ternary_codebook,
}


# ---------------------------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class _Format:
    """One way to store indices: its size, when the model can use it, and its decoder."""

    describe: Callable[[int, Model], str]
    unavailable: Callable[[int, Model], str | None]
    nbytes: Callable[[int, int, Model], int]
    #: Builds the constants and nodes that turn the stored indices into int32 indices of the weight's shape.
    build: Callable[[DecoderBuilder, np.ndarray, int, Model], gs.Variable]


def _cast_int32(b: DecoderBuilder, stored: gs.Constant, shape: tuple[int, ...]) -> gs.Variable:
    # NOTE: Gather's indices must be int32 or int64 (onnxruntime rejects uint8 and uint4 ones): Cast first.
    return b.op("Cast", [stored], np.int32, shape, to=onnx.TensorProto.INT32)


# uint8: one byte per index. Cast (opset 6 gives Cast an int ``to``) and Gather exist at every usable opset.
def _uint8_build(b: DecoderBuilder, codes: np.ndarray, bits: int, model: Model) -> gs.Variable:
    return _cast_int32(b, b.const("indices", codes.astype(np.uint8)), codes.shape)


# subbyte: ONNX's packed UINT4 (opset 21, IR 10) or UINT2 (opset 25, IR 11), two or four per byte.
def _subbyte_type(bits: int, model: Model) -> tuple[int, int] | None:
    """(ONNX data type, bits per element) of the narrowest sub-byte type the model allows, or None."""
    if bits <= 2 and model.opset >= 25 and model.ir_version >= 11:
        return onnx.TensorProto.UINT2, 2
    if bits <= 4 and model.opset >= 21 and model.ir_version >= 10:
        return onnx.TensorProto.UINT4, 4
    return None


def _subbyte_unavailable(bits: int, model: Model) -> str | None:
    if bits > 4:
        return f"subbyte storage holds at most 4-bit indices, not {bits}"
    if _subbyte_type(bits, model) is None:
        return (f"subbyte storage needs opset >= 21 and IR >= 10 (UINT4); the model has opset {model.opset}, "
                f"IR {model.ir_version}")
    return None


def _subbyte_build(b: DecoderBuilder, codes: np.ndarray, bits: int, model: Model) -> gs.Variable:
    data_type, width = _subbyte_type(bits, model)  # type: ignore[misc]  # not None: the format's check passed
    per = 8 // width
    flat = codes.reshape(-1)
    padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
    padded[:flat.size] = flat
    # NOTE: ONNX packs sub-byte elements from the low bits up: element 2i is the low nibble of byte i.
    lanes = padded.reshape(-1, per)
    raw = np.zeros(lanes.shape[0], dtype=np.uint8)
    for j in range(per):
        raw |= lanes[:, j] << np.uint8(j * width)
    stored = b.lazy_const("indices", data_type, codes.shape, raw.tobytes())
    return _cast_int32(b, stored, codes.shape)


# bitpack: floor(W / bits) fields per W-bit word, unpacked with two BitShifts (opset 11).
#: Word types onnxruntime's BitShift implements (uint16 it does not).
_WORDS: tuple[np.dtype, ...] = (np.dtype(np.uint8), np.dtype(np.uint32), np.dtype(np.uint64))


def _bitpack_word(bits: int) -> tuple[np.dtype, int]:
    """The word type that stores ``bits``-wide fields densest (the smaller word on ties), and fields per word."""
    word = min(_WORDS, key=lambda w: (w.itemsize * 8 / (w.itemsize * 8 // bits), w.itemsize))
    return word, word.itemsize * 8 // bits


def _bitpack_unavailable(bits: int, model: Model) -> str | None:
    if model.opset < 11:
        return f"bitpack storage needs BitShift (opset >= 11); the model has opset {model.opset}"
    return None


def _bitpack_nbytes(n: int, bits: int, model: Model) -> int:
    word, per = _bitpack_word(bits)
    return -(-n // per) * word.itemsize


def _bitpack_build(b: DecoderBuilder, codes: np.ndarray, bits: int, model: Model) -> gs.Variable:
    word, per = _bitpack_word(bits)
    width = word.itemsize * 8
    flat = codes.reshape(-1)
    words = -(-flat.size // per)
    padded = np.zeros(words * per, dtype=np.uint8)
    padded[:flat.size] = flat
    lanes = padded.reshape(words, per)
    packed = np.zeros(words, dtype=word)
    for j in range(per):  # field j holds bits [j*bits, (j+1)*bits) of its word
        packed |= lanes[:, j].astype(word) << word.type(j * bits)
    stored = b.const("indices", packed.reshape(words, 1))
    # Shifting field j to the top of the word and then down by width - bits isolates it, with BitShift only
    # (BitwiseAnd would need opset 18); [words, 1] against [per] broadcasts to [words, per].
    left = b.const("shift_left", np.array([width - bits * (j + 1) for j in range(per)], dtype=word))
    right = b.const("shift_right", np.array([width - bits], dtype=word))
    fields = b.op("BitShift", [stored, left], word, (words, per), direction="LEFT")
    fields = b.op("BitShift", [fields, right], word, (words, per), direction="RIGHT")
    indices = b.op("Cast", [fields], np.int32, (words, per), to=onnx.TensorProto.INT32)
    if words * per != flat.size:
        # The last word has unused fields: flatten and cut them off before taking the weight's shape.
        flat_shape = b.const("flat_shape", np.array([-1], dtype=np.int64))
        indices = b.op("Reshape", [indices, flat_shape], np.int32, (words * per,))
        starts = b.const("starts", np.array([0], dtype=np.int64))
        ends = b.const("ends", np.array([flat.size], dtype=np.int64))
        indices = b.op("Slice", [indices, starts, ends], np.int32, (flat.size,))
    shape = b.const("shape", np.array(codes.shape, dtype=np.int64))
    return b.op("Reshape", [indices, shape], np.int32, codes.shape)


def _never(bits: int, model: Model) -> str | None:
    return None


#: Index storage formats by option value. "auto" picks the smallest available (then the earliest here).
FORMATS: dict[str, _Format] = {
    "uint8": _Format(lambda bits, m: "uint8", _never, lambda n, bits, m: n, _uint8_build),
    "subbyte": _Format(
        lambda bits, m: "uint2" if _subbyte_type(bits, m) == (onnx.TensorProto.UINT2, 2) else "uint4",
        _subbyte_unavailable,
        lambda n, bits, m: -(-n * _subbyte_type(bits, m)[1] // 8),  # type: ignore[index]  # as _subbyte_build
        _subbyte_build,
    ),
    "bitpack": _Format(
        lambda bits, m: f"bitpack({_bitpack_word(bits)[1]}x{bits}-bit in {_bitpack_word(bits)[0].name})",
        _bitpack_unavailable,
        _bitpack_nbytes,
        _bitpack_build,
    ),
}


def choose_format(storage: str, bits: int, n: int, model: Model) -> str:
    """The storage format for ``n`` indices of ``bits`` bits: ``storage`` itself, or the smallest for auto.

    Raises:
        _Decline: the asked-for format is not available for this model.
    """
    if storage != "auto":
        why = FORMATS[storage].unavailable(bits, model)
        if why is not None:
            raise _Decline(why)
        return storage
    usable = [name for name, f in FORMATS.items() if f.unavailable(bits, model) is None]
    # The bit-shift decoder is four to six nodes where the others are one: on a tie, the simpler one.
    return min(usable, key=lambda name: (FORMATS[name].nbytes(n, bits, model), name == "bitpack"))


# ---------------------------------------------------------------------------------------------- weights
def _conv_axis(node: gs.Node, ndim: int) -> int | None:
    return 0  # [M, C/group, k...]


def _conv_transpose_axis(node: gs.Node, ndim: int) -> int | None:
    # NOTE: ConvTranspose weight is [C, M/group, k...]: axis 1 is the output channel within its group.
    return 1


def _gemm_axis(node: gs.Node, ndim: int) -> int | None:
    return 0 if int(node.attrs.get("transB", 0)) else 1  # B is [N, K] with transB, else [K, N]


def _matmul_axis(node: gs.Node, ndim: int) -> int | None:
    return ndim - 1 if ndim >= 2 else None  # B is [..., K, N]; a 1-D B has no output-channel axis


#: Op type → (input index of its weight, output-channel axis of that weight for ``per_channel``).
WEIGHT_INPUTS: dict[str, tuple[int, Callable[[gs.Node, int], int | None]]] = {
    "Conv": (1, _conv_axis),
    "ConvTranspose": (1, _conv_transpose_axis),
    "Gemm": (1, _gemm_axis),
    "MatMul": (1, _matmul_axis),
}


@dataclass
class _GraphFacts:
    """What the checks and the rewrite of every weight of one graph need, found once per graph: a walk over
    the whole model per weight would make the pass quadratic in the node count."""

    #: ids of the graph's own nodes (the pass adds decoders only after the last weight is done).
    node_ids: set[int]
    #: The graph and all its subgraphs: where a tensor of the graph can be a graph output.
    scope: list[gs.Graph]
    #: ids of the tensors that are an output of any graph of the model.
    model_outputs: set[int]


@dataclass
class _Weight:
    """One constant tensor to share, the nodes that read it and what the report says about it."""

    graph: gs.Graph
    tensor: gs.Tensor
    #: The nodes that made it a candidate, each with the input index and the rule giving its channel axis.
    slots: list[tuple[gs.Node, int, Callable[[gs.Node, int], int | None]]]
    label: str  # the first candidate reader's name, for the report
    op_type: str  # its op type
    figures: dict[str, Figure]  # the report's figures, filled in while the weight is rewritten
    facts: _GraphFacts

    @property
    def readers(self) -> list[gs.Node]:
        """Every node that reads the tensor, in any graph, whatever made it a candidate."""
        return list({id(n): n for n in self.tensor.outputs}.values())


def _node_label(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def _first_axis(node: gs.Node, ndim: int) -> int | None:
    return 0 if ndim >= 1 else None


def _is_float_constant(tensor: gs.Tensor) -> bool:
    values = constant_node_payload(tensor.inputs[0]) if len(tensor.inputs) == 1 else tensor
    if not isinstance(values, (gs.Constant, np.ndarray)) or values.dtype is None:
        return False
    return np.dtype(values.dtype) in _FLOAT_DTYPES


def _distinct(values: np.ndarray) -> int:
    ordered = np.sort(values.reshape(-1))
    return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1 if ordered.size else 0


class KMeansWeightSharing(Pass[KMeansOptions]):
    """Share each weight tensor's values among k = 2^bits k-means centroids: a codebook plus indices.

    Matches: constant floating-point weights of Conv, ConvTranspose, Gemm (B) and MatMul (B), initializers
    or Constant-node outputs, of at least ``min_size`` elements, in the main graph and in subgraphs, whose
    readers are all selected by ``nodes`` / ``exclude``; with ``all_initializers``, any other float16/32/64
    constant of that size too. Declined with a reason: non-constant or non-float weights, small ones,
    weights that are graph outputs or read from several graphs, and weights the rewrite would not shrink.

    Rewrites: the weight becomes a codebook (one, or one per output channel with ``per_channel``) and an
    index per element, decoded in the graph so stock onnxruntime runs it::

        Conv(X, W [M, C, kh, kw] float)
          →  Conv(X, Gather(codebook [k], Cast(indices [M, C, kh, kw] uint8 | uint4, to=int32)))
          →  (bitpack) Conv(X, Gather(codebook, Reshape(Cast(BitShift(BitShift(words [P, 1], L), R)))))
          →  (per_channel) ... Gather(codebooks [M·k], Add(indices, channel offsets [M, 1, 1, 1]))

    Indices take the smallest storage the model's opset allows (``storage``): ONNX UINT4/UINT2 at opset
    >= 21/25, else bits-wide fields packed into uint8/uint32/uint64 words and unpacked with BitShift (opset
    >= 11), else uint8. The opset is never raised.

    ``mode=binary`` and ``mode=ternary`` replace k-means by fixed codebooks, stored and decoded the same way:
    [-α, +α] with α = mean|W| (1-bit indices), or [0, -α, +α] with 0 where |W| <= ``threshold`` · mean|W|
    and α the mean |W| above it (2-bit indices); α per tensor, or per output channel with ``per_channel``.

    Lossy: every value becomes the mean of its cluster (scikit-learn KMeans started by k-means++, seeded
    from the pipeline seed and the tensor's name, or by quantiles with ``init=quantiles``); exact for tensors with at most k distinct values.
    Exact zeros stay exact zeros (``keep_zeros``), so pruned weights stay pruned. With ``--data`` (``refit=auto``)
    the centroids of each Conv/Gemm/MatMul weight are then refit, assignments fixed, by least squares to the
    layer's outputs on the data, with a per-channel bias correction; kept per channel where held-out samples
    say the output error drops (the layer's ``refit`` figures: held-out output error before → after).
    Preconditions: none. onnxruntime folds the decoding into plain weights when it creates a session with
    graph optimisations on: the file and the bytes to load shrink, the memory of a running session does not.
    """

    name = "kmeans"
    lossy = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        weights = self._collect(model, opts)
        started = time.perf_counter()
        self._refit_note = ""
        self._refits = self._plan_refits(model, weights, opts, ctx)
        refit_seconds = time.perf_counter() - started
        taken = taken_names(model)
        layers: list[LayerDecision] = []
        inserts: dict[int, list[gs.Node]] = {}
        dropped: set[int] = set()
        positions = {id(n): i for g in model.all_graphs() for i, n in enumerate(g.nodes)}
        started = time.perf_counter()
        # Heavy imports, here rather than at module level; scikit-learn first, so that its OpenMP runtime
        # is loaded when threadpoolctl looks for the thread pools to limit.
        import sklearn.cluster  # noqa: F401
        from threadpoolctl import threadpool_limits

        # One thread for OpenMP and BLAS while clustering. scikit-learn's Lloyd iterations add per-thread
        # partial sums in the order the threads finish, which can change the last bits of a centroid (runs
        # must be byte-identical); and on small 1-D problems the threads only wait for each other (a KMeans
        # fit on 512 values took 160 ms with two threads on a busy 2-core machine, 5 ms with one).
        with threadpool_limits(limits=1):
            for done, weight in enumerate(weights, start=1):
                ctx.progress(done - 1, len(weights), weight.label)
                readers = weight.readers  # before the rewrite moves them to the decoded tensor
                try:
                    nodes = self._rewrite(model, weight, opts, ctx, taken)
                except _Decline as why:
                    if not why.quiet:
                        layers.append(LayerDecision(weight.label, weight.op_type, "declined", str(why), weight.figures))
                    continue
                layers.append(LayerDecision(weight.label, weight.op_type, "rewritten", figures=weight.figures))
                first = min(readers, key=lambda n: positions[id(n)])
                inserts.setdefault(id(first), []).extend(nodes)
                if not isinstance(weight.tensor, gs.Constant):
                    dropped.add(id(weight.tensor.inputs[0]))  # the Constant node that nothing reads any more
        for graph in model.all_graphs():
            if any(id(n) in inserts or id(n) in dropped for n in graph.nodes):
                rebuilt: list[gs.Node] = []
                for node in graph.nodes:
                    if id(node) in dropped:
                        node.outputs.clear()
                        continue
                    rebuilt.extend(inserts.get(id(node), []))  # decoders only read constants: any place works
                    rebuilt.append(node)
                graph.nodes = rebuilt
        rewritten = [entry for entry in layers if entry.action == "rewritten"]
        before = sum(entry.int_figure("bytes_before") for entry in rewritten)
        after = sum(entry.int_figure("bytes_after") for entry in rewritten)
        return PassResult(
            modified=bool(rewritten),
            stats={
                "weights_rewritten": len(rewritten),
                "weights_declined": len(layers) - len(rewritten),
                "weight_elements_shared": sum(entry.int_figure("elements") for entry in rewritten),
                "weight_bytes_before": before,
                "weight_bytes_after": after,
                "weight_bytes_saved": before - after,
                "clustering_seconds": round(time.perf_counter() - started, 3),
                **self._refit_stats(rewritten, refit_seconds, self._refit_note),
            },
            layers=layers,
        )

    # ------------------------------------------------------------------------------------------ selection
    def _collect(self, model: Model, opts: KMeansOptions) -> list[_Weight]:
        """The candidate weights in graph order, each once, with the nodes that made them candidates."""
        found: dict[int, _Weight] = {}
        graphs = model.all_graphs()
        outputs = graph_outputs(model)
        for graph in graphs:
            facts = _GraphFacts({id(n) for n in graph.nodes}, all_graphs(graph), outputs)
            for node in graph.nodes:
                if not is_onnx_op(node):
                    continue
                slot = WEIGHT_INPUTS.get(node.op)
                for index, tensor in enumerate(node.inputs):
                    if slot is not None and index == slot[0]:
                        axis_of = slot[1]
                    elif opts.all_initializers and not tensor.is_empty() and _is_float_constant(tensor):
                        axis_of = _first_axis
                    else:
                        continue
                    weight = found.get(id(tensor))
                    if weight is None:
                        figures: dict[str, Figure] = {"tensor": tensor.name}
                        weight = _Weight(graph, tensor, [], _node_label(node), node.op, figures, facts)
                        found[id(tensor)] = weight
                    weight.slots.append((node, index, axis_of))
        return list(found.values())

    # ------------------------------------------------------------------------------------------ refit
    def _plan_refits(self, model: Model, weights: list[_Weight], opts: KMeansOptions, ctx: PassContext,
                     ) -> dict[int, tuple[_kmeans_refit.Layer, list[np.ndarray], list[np.ndarray]]]:
        """Per weight (by tensor id) the centroid refit can serve: its layer and the layer's input rows and
        outputs on the data, from one run of the unchanged model per sample. Empty with refit=off or no data."""
        if opts.refit == "off" or not ctx.samples:
            return {}
        if len(ctx.samples) < MIN_REFIT_SAMPLES:
            self._refit_note = f"not refit: {len(ctx.samples)} samples, fewer than {MIN_REFIT_SAMPLES}"
            return {}
        layers: dict[int, _kmeans_refit.Layer] = {}
        for weight in weights:
            node, index, _ = weight.slots[0]
            values = constant_values(weight.tensor)
            if weight.graph is not model.graph or index != 1 or values is None or np.size(values) < opts.min_size:
                continue
            found = _kmeans_refit.plan(node, np.asarray(values), len(weight.readers))
            if isinstance(found, str):
                weight.figures["refit"] = f"not refit: {found}"
            else:
                layers[id(weight.tensor)] = found
        return _kmeans_refit.collect_planned(model, layers, ctx.samples, ctx.seed_for("kmeans:refit"))

    def _refit(self, weight: _Weight, codes: np.ndarray, codebook: np.ndarray, per_channel: bool, exact: bool,
               opts: KMeansOptions, ctx: PassContext) -> tuple[np.ndarray, np.ndarray | None]:
        """The codebook refit to the layer's outputs (and a bias correction), or the k-means one as it is."""
        planned = getattr(self, "_refits", {}).get(id(weight.tensor))
        if planned is None:
            return codebook, None
        layer, xs, ys = planned
        if exact:
            weight.figures["refit"] = "not refit: the codebook holds the weight's values exactly"
            return codebook, None
        if per_channel and codebook.size > _kmeans_refit.MAX_UNKNOWNS:
            weight.figures["refit"] = f"not refit: {codebook.size} centroids > {_kmeans_refit.MAX_UNKNOWNS}"
            return codebook, None
        started = time.perf_counter()
        new, delta, used = _kmeans_refit.refit(layer, codes, codebook, per_channel, xs, ys,
                                               ctx.seed_for(f"kmeans:refit:{weight.tensor.name}"))
        figures = layer.figures
        weight.figures["refit"] = {"fit": "data" if used else "weights", **figures,
                                   "bias_corrected": bool(used and delta is not None),
                                   "seconds": round(time.perf_counter() - started, 4)}
        if not used:
            return codebook, None
        return new, delta

    def _correct_bias(self, weight: _Weight, delta: np.ndarray | None) -> None:
        """Add the refit's bias correction to the layer's bias (after the rewrite is certain)."""
        planned = getattr(self, "_refits", {}).get(id(weight.tensor))
        if delta is None or planned is None or planned[0].bias_tensor is None:
            return
        tensor = planned[0].bias_tensor
        bias = np.asarray(tensor.values)
        tensor.values = (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype)

    @staticmethod
    def _refit_stats(rewritten: list[LayerDecision], seconds: float, note: str) -> dict[str, Figure]:
        """Stats of the centroid refit (none when no layer was planned for it)."""
        refits = [e.figures.get("refit") for e in rewritten]
        if not any(isinstance(r, dict) for r in refits):
            return {"refit": note} if note else {}
        done = [r for r in refits if isinstance(r, dict) and r.get("fit") == "data"]
        return {"layers_refit": len(done),
                "refit_seconds": round(seconds + sum(float(r["seconds"]) for r in refits if isinstance(r, dict)), 3)}

    def _check(self, model: Model, weight: _Weight, opts: KMeansOptions) -> np.ndarray:
        values = constant_values(weight.tensor)
        if values is None:
            raise _Decline("weight is not a constant")
        values = np.asarray(values)
        if values.dtype not in _FLOAT_DTYPES:
            raise _Decline(f"weight is {values.dtype}, not float16/32/64")
        if values.size < opts.min_size:
            # Biases, scales and scalars are many and never worth a line each.
            quiet = not any(WEIGHT_INPUTS.get(node.op, (None,))[0] == index for node, index, _ in weight.slots)
            raise _Decline(f"{values.size} elements, below min_size={opts.min_size}", quiet=quiet)
        readers = weight.readers
        unselected = [n for n in readers if not opts.selects(n.name or "")]
        if unselected:
            raise _Decline(f"also read by unselected node {_node_label(unselected[0])}")
        if any(id(r) not in weight.facts.node_ids for r in readers):
            raise _Decline("read from more than one graph")
        if id(weight.tensor) in weight.facts.model_outputs:
            raise _Decline("weight is a graph output")
        if not np.all(np.isfinite(values)):
            raise _Decline("weight has NaN or infinite values")
        return values

    # ------------------------------------------------------------------------------------------ rewriting
    def _rewrite(
        self, model: Model, weight: _Weight, opts: KMeansOptions, ctx: PassContext, taken: set[str]
    ) -> list[gs.Node]:
        """Cluster one weight, build its decoder and point its readers at it; return the decoder's nodes."""
        values = self._check(model, weight, opts)
        entry = weight.figures
        n = values.size
        fmt_name = choose_format(opts.storage, opts.index_bits, n, model)
        axes = {axis_of(node, values.ndim) for node, _, axis_of in weight.slots}
        axis = next(iter(axes)) if len(axes) == 1 else None
        per_channel = opts.per_channel and axis is not None
        if opts.per_channel and not per_channel:
            why = "its readers disagree on the channel axis" if len(axes) > 1 else "it has no channel axis"
            entry["note"] = f"per tensor: {why}"
        find = CODEBOOKS[opts.mode]
        dtype = values.dtype
        work = values.astype(np.float32) if dtype == np.float16 else values  # sort and bin in 32 bits at least
        seed = ctx.seed_for(f"{self.name}:{weight.tensor.name}")

        started = time.perf_counter()
        if per_channel and axis is not None:  # per_channel implies an axis; the test names it for mypy
            rows = np.moveaxis(work, axis, 0).reshape(values.shape[axis], -1)
            results = [find(row, opts, seed) for row in rows]
            codebook = np.zeros((rows.shape[0], max(r.codebook.size for r in results)), dtype=np.float64)
            for c, r in enumerate(results):
                codebook[c, :r.codebook.size] = r.codebook
            row_codes = np.stack([r.codes for r in results])
            moved_shape = (values.shape[axis], *(d for i, d in enumerate(values.shape) if i != axis))
            codes = np.ascontiguousarray(np.moveaxis(row_codes.reshape(moved_shape), 0, axis))
            exact = all(r.exact for r in results)
            distinct = _distinct(work)
        else:
            rows = work.reshape(1, -1)
            result = find(rows[0], opts, seed)
            codebook = result.codebook[None, :]
            row_codes = result.codes[None, :]
            codes = result.codes.reshape(values.shape)
            exact, distinct = result.exact, result.distinct
        seconds = time.perf_counter() - started
        # The refit changes centroid values only, never the assignments.
        codebook, delta = self._refit(weight, codes, codebook, per_channel, exact, opts, ctx)

        stored_codebook = codebook.astype(dtype)
        error, max_abs, used = _errors(rows, row_codes, stored_codebook)
        b = DecoderBuilder(_PREFIX, weight.tensor.name or "weight", taken)
        indices = FORMATS[fmt_name].build(b, codes, opts.index_bits, model)
        if per_channel and axis is not None:
            offsets_shape = [1] * values.ndim
            offsets_shape[axis] = codebook.shape[0]
            offsets = (np.arange(codebook.shape[0], dtype=np.int32) * codebook.shape[1]).reshape(offsets_shape)
            indices = b.op("Add", [indices, b.const("channel_offsets", offsets)], np.int32, values.shape)
        table = b.const("codebook", stored_codebook.reshape(-1))
        decoded = b.op("Gather", [table, indices], dtype, values.shape)
        bytes_before = n * dtype.itemsize
        bytes_after = sum(stored_bytes(c) for c in b.constants)
        entry.update({
            "mode": opts.mode,
            "bits": opts.index_bits,
            "k": int(codebook.shape[1]),
            "granularity": f"per channel (axis {axis}, {len(codebook)} codebooks)" if per_channel else "per tensor",
            "storage": FORMATS[fmt_name].describe(opts.index_bits, model),
            "elements": int(n),
            "distinct_before": distinct,
            "distinct_after": int(np.unique(stored_codebook.reshape(-1)[used]).size),
            "exact": exact,
            "zeros": int(np.count_nonzero(values == 0)),
            "rel_error": float(f"{error:.6g}"),
            "max_abs_error": float(f"{max_abs:.6g}"),
            "bytes_before": int(bytes_before),
            "bytes_after": int(bytes_after),
            "seconds": round(seconds, 4),
        })
        if opts.mode == "ternary":
            entry["zeros_after"] = int(sum(np.count_nonzero(stored_codebook[r][row_codes[r]] == 0)
                                           for r in range(rows.shape[0])))
        if bytes_after >= bytes_before:
            raise _Decline(f"codebook and indices ({bytes_after} bytes) would not be smaller than the weight "
                           f"({bytes_before})")
        replace_tensor(weight.graph, weight.tensor, decoded, graphs=weight.facts.scope)
        self._correct_bias(weight, delta)
        return b.nodes


def _errors(rows: np.ndarray, row_codes: np.ndarray, codebook: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Relative Frobenius error ‖W − Ŵ‖/‖W‖, max |W − Ŵ|, and which flat codebook entries are used.

    Args:
        rows: the weight as [codebooks, values per codebook]; row_codes: each value's index in its row's
            codebook; codebook: [codebooks, k].
    """
    table = codebook.astype(np.float64)
    sq_err = sq_ref = max_abs = 0.0
    used = np.zeros(table.shape, dtype=bool)
    for r in range(rows.shape[0]):
        for begin in range(0, rows.shape[1], _BLOCK):
            ref = rows[r, begin:begin + _BLOCK].astype(np.float64)
            codes = row_codes[r, begin:begin + _BLOCK]
            diff = ref - table[r][codes]
            sq_err += float(diff @ diff)
            sq_ref += float(ref @ ref)
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
            used[r, :] |= np.bincount(codes, minlength=table.shape[1])[:table.shape[1]] > 0
    error = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else (0.0 if sq_err == 0 else math.inf)
    return error, max_abs, used.reshape(-1)
