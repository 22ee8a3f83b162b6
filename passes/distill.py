"""distill: fine-tune the compressed model's float weights so its outputs match the original model's (PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.errors import InputError, OptionError, first_line
from nnopt.ir.model import Model
from nnopt.pipeline.base import LayerDecision, Pass, PassContext, PassOptions, PassResult
from nnopt.runtime import make_session, run_model

if TYPE_CHECKING:
    from nnopt.passes._distill_train import Data, History, Target
    from nnopt.passes._torch_graph import TorchGraph

#: The one line a user sees when the extra is not installed (the CLI exits 2, nothing is written).
MISSING_TORCH = "distill needs PyTorch: pip install 'nnopt[train]'"
#: The interpreter must reproduce onnxruntime's outputs to this relative error before it may train.
INTERPRETER_TOLERANCE = 1e-4
#: With QuantizeLinear in the graph: a float sum that lands on the other side of a rounding boundary
#: (summation order differs between torch and onnxruntime) moves an activation by one integer step, and
#: that step propagates; the softmax outputs of ppocr_cls differ by 1/255 (one uint8 step) so.
QUANTIZED_TOLERANCE = 1e-2
#: Samples the interpreter is checked on against onnxruntime.
CHECK_SAMPLES = 8


@dataclass(frozen=True)
class DistillOptions(PassOptions):
    epochs: int = field(default=30, metadata={"help": "at most this many passes over the training split"})
    max_seconds: float = field(
        default=300.0,
        metadata={"help": "stop training after this many seconds (a run cut by time depends on the machine's "
                          "speed: epochs is the deterministic bound)"},
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam's learning rate"})
    temperature: float = field(default=2.0, metadata={"help": "softens class scores before the KL divergence"})
    batch_size: int = field(default=32, metadata={"help": "samples per training step"})
    heldout: float = field(
        default=0.25, metadata={"help": "fraction of the data held out for early stopping and the metric"}
    )
    patience: int = field(default=5, metadata={"help": "stop after this many epochs without a better held-out loss"})
    label_weight: float = field(
        default=0.5,
        metadata={"help": "weight of the cross-entropy on the data file's labels (when it has them) against "
                          "the teacher's soft targets"},
    )
    loss: Literal["auto", "mse"] = field(
        default="auto",
        metadata={"help": "auto: KL divergence on class scores (a Softmax output, or a float [batch, classes] "
                          "one), MSE on the rest; mse: MSE on every output (regression heads)"},
    )
    threads: int = field(
        default=1, metadata={"help": "torch threads (the output is deterministic per seed and thread count)"}
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be at least 1")
        if self.patience < 1:
            raise OptionError("patience must be at least 1")
        if not (self.max_seconds > 0 and self.lr > 0 and self.temperature > 0):
            raise OptionError("max_seconds, lr and temperature must be positive")
        if not 0 < self.heldout < 1:
            raise OptionError("heldout must be between 0 and 1")
        if not 0 <= self.label_weight <= 1:
            raise OptionError("label_weight must be between 0 and 1")


class Distill(Pass[DistillOptions]):
    """Fine-tune float weights towards the original model's outputs (after prune/svd, before kmeans/quantize).

    Matches: a main graph whose every node the built-in ONNX→PyTorch interpreter runs (Conv, Gemm, MatMul,
    BatchNormalization, pools, common activations, Softmax, shape ops...), given reference data
    (``--data``). Trains: the float constants read as weights (Conv/ConvTranspose/Gemm weights and
    biases, MatMul constants, BatchNormalization scale and bias, a constant added after MatMul/Gemm/Conv,
    a float table read by Gather such as a kmeans codebook), initializers or Constant nodes alike, one
    parameter per tensor however many nodes read it; and, in a quantized (QDQ) graph, the integer weights
    read by DequantizeLinear, as float shadows fake-quantized on their fixed scales (quantization-aware
    training: QuantizeLinear rounds activations with a straight-through gradient). Other integer tensors
    (kmeans indices, shapes) stay. Rewrites: only those tensors' values (dtype kept, int8 weights
    re-quantized on the same grid); the node list is unchanged.

    The teacher is the pipeline's input model, run in onnxruntime. Loss: KL divergence at ``temperature``
    on class scores (a float [batch, classes] output, or a Softmax's probabilities read through their
    log), MSE on other outputs, plus a cross-entropy on the data file's ``labels`` array when it has one.
    Adam for at most ``epochs`` / ``max_seconds``, early stopping on a held-out split of the data; the
    weights with the best held-out loss are kept, the original ones if none beats them. Lossy; needs the
    ``train`` extra (``pip install 'nnopt[train]'``). Deterministic for a seed and ``threads`` on CPU.

    Place it after the passes that change structure (prune, svd, conv-to-separable), before those that
    share or quantize values (kmeans, quantize), which then only need their own reconstruction. After
    kmeans it trains the codebooks (indices fixed), after quantize the int8 weights on their grids and the
    float biases (docs/distill.md, QAT). Declined, with the reason: no data, an op the
    interpreter does not run, outputs it does not reproduce, nothing trainable, no held-out improvement.
    """

    name = "distill"
    lossy = True

    def __init__(self, options: DistillOptions | None = None) -> None:
        super().__init__(options)
        # Checked when the pipeline is built, before any model is read: a missing extra is the user's to fix.
        try:
            import torch  # noqa: F401
        except ImportError:
            raise InputError(MISSING_TORCH) from None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from nnopt.passes._torch_graph import TorchGraph
        from nnopt.passes._torch_ops import UnsupportedOp

        if not ctx.samples:
            return _declined("no reference data: distill trains on --data")
        if ctx.reference_model is None:
            return _declined("no original model to learn from (run distill in a pipeline)")
        if len(ctx.samples) < 4:
            return _declined(f"{len(ctx.samples)} samples: too few to hold some out")
        try:
            net = TorchGraph(model.graph, model.opset)
        except UnsupportedOp as exc:
            return _declined(first_line(exc, 300))
        if not net.weights:
            return _declined("no float weight to train (nor an integer one read by DequantizeLinear)")
        return self._distill(model, ctx, net)

    def _distill(self, model: Model, ctx: PassContext, net: TorchGraph) -> PassResult:
        from nnopt.passes._distill_train import Settings, deterministic, train

        opts = self.options
        settings = Settings(opts.epochs, opts.max_seconds, opts.lr, opts.temperature, opts.batch_size,
                            opts.patience, opts.label_weight, opts.threads, ctx.seed_for(self.name))
        rng = ctx.rng(self.name)
        with deterministic(opts.threads, settings.seed):
            data, error = _prepare(model, ctx, net, rng, opts.heldout)
            if data is None:
                return _declined(error)
            targets = _targets(model.graph, model.opset, [t[0] for t in data.teacher], opts.loss)
            if not _labels_fit(targets, data):
                data.labels = None  # e.g. per-step scores [batch, steps, classes]: one label per sample says nothing
            history = train(net, data, targets, settings, rng,
                            lambda epoch: ctx.progress(epoch, opts.epochs, f"epoch {epoch}"))
        stats = _stats(history, net, data, opts.threads)
        if history.best_epoch == 0:
            return PassResult(False, stats, [LayerDecision(
                "(model)", "", "declined", "training did not lower the held-out loss: the weights are kept")])
        layers = _changes(net)
        net.write_back()
        return PassResult(True, stats, layers)


# ---------------------------------------------------------------------------------------------- data
def _prepare(
    model: Model, ctx: PassContext, net: TorchGraph, rng: np.random.Generator, heldout: float
) -> tuple[Data | None, str]:
    """Inputs and teacher outputs as tensors, the split, and the batching mode; or None and why not."""
    import torch

    from nnopt.passes._distill_train import Data

    assert ctx.reference_model is not None
    teacher_session = make_session(ctx.reference_model)
    student_names = net.output_names
    teacher_names = [o.name for o in teacher_session.get_outputs()]
    if teacher_names != student_names:
        return None, f"outputs {student_names} differ from the original model's {teacher_names}"
    feeds = [{k: _as_tensor(v) for k, v in s.items() if k in net.input_names} for s in ctx.samples]
    teacher = [[_as_tensor(y) for y in run_model(teacher_session, s)] for s in ctx.samples]
    if any(t.dim() == 0 for t in teacher[0]):
        return None, "an output has no batch axis"
    order = rng.permutation(len(feeds))
    n_held = min(max(1, round(heldout * len(feeds))), len(feeds) - 1)
    labels = None
    if ctx.labels is not None and len(ctx.labels) == len(feeds):
        labels = torch.from_numpy(np.asarray(ctx.labels, dtype=np.int64))
    data = Data(feeds, teacher, labels, np.sort(order[n_held:]), np.sort(order[:n_held]))
    error = _check_interpreter(model, ctx, net, data)
    if error:
        return None, error
    return data, ""


def _as_tensor(value: Any) -> Any:
    import torch

    array = np.asarray(value)
    return torch.from_numpy(np.ascontiguousarray(array.astype(np.float32) if array.dtype.kind == "f" else array))


def _check_interpreter(model: Model, ctx: PassContext, net: TorchGraph, data: Data) -> str:
    """'' when the interpreter reproduces onnxruntime on the current model (and sets ``data.batched`` when
    samples may run concatenated); else why it may not train."""
    import torch

    from nnopt.passes._distill_train import forward

    session = make_session(model.to_proto())
    index = np.arange(min(CHECK_SAMPLES, len(data.feeds)))
    ort_outs = [np.concatenate(ys) for ys in zip(*(run_model(session, ctx.samples[i]) for i in index))]
    with torch.no_grad():
        single = forward(net, data, index)
        data.batched = True
        try:
            batched = forward(net, data, index)
            data.batched = all(_relative(b.numpy(), s.numpy()) <= INTERPRETER_TOLERANCE for b, s in zip(batched, single))
        except Exception:  # boundary: any op may refuse a batch (a Reshape to [1, -1]): then sample by sample
            data.batched = False
    error = max(_relative(s.numpy(), o) for s, o in zip(single, ort_outs))
    data.interpreter_error = error
    quantized = any(step.node.op == "QuantizeLinear" for step in net.steps)
    if not error <= (QUANTIZED_TOLERANCE if quantized else INTERPRETER_TOLERANCE):
        return f"the interpreter's outputs differ from onnxruntime's by {error:.2g} (relative): not trained"
    return ""


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b).max(initial=0.0) / max(1.0, float(np.abs(b).max(initial=0.0))))


def _targets(graph: gs.Graph, opset: int, outputs: list[Any], loss: str) -> list[Target]:
    """How each output is compared: class scores (and of which kind) or plain values."""
    from nnopt.passes._distill_train import Target

    targets = []
    for tensor, example in zip(graph.outputs, outputs):
        producer = _producer(tensor)
        if loss == "mse":
            targets.append(Target("values"))
        elif producer is not None and producer.op in ("Softmax", "LogSoftmax"):
            default = -1 if opset >= 13 else 1
            axis = int(producer.attrs.get("axis", default))
            targets.append(Target("probs", axis) if producer.op == "Softmax" else Target("logprobs", axis))
        elif example.is_floating_point() and example.dim() == 2 and example.shape[1] > 1:
            targets.append(Target("logits", 1))
        else:
            targets.append(Target("values"))
    return targets


def _labels_fit(targets: list[Target], data: Data) -> bool:
    """Whether the labels can score the first class-score output: one [batch, classes] row per sample."""
    scored = next((i for i, t in enumerate(targets) if t.kind != "values"), None)
    if data.labels is None or scored is None:
        return False
    example = data.teacher[0][scored]
    return example.dim() == 2 and example.shape[0] == 1 and targets[scored].axis in (1, -1)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node computing ``tensor``, looking through Identity nodes."""
    while tensor.inputs:
        node = tensor.inputs[0]
        if node.op != "Identity":
            return node
        tensor = node.inputs[0]
    return None


# ---------------------------------------------------------------------------------------------- report
def _declined(reason: str) -> PassResult:
    return PassResult(False, {"trained": False}, [LayerDecision("(model)", "", "declined", reason)])


def _stats(history: History, net: TorchGraph, data: Data, threads: int) -> dict[str, Any]:
    return {
        "trained": history.best_epoch > 0,
        "epochs_run": len(history.train_loss),
        "best_epoch": history.best_epoch,
        "stopped_by": history.stopped_by,
        "seconds": history.seconds,
        "train_loss": history.train_loss,
        "heldout_loss": history.heldout_loss,
        "metric": history.metric,
        "metric_before": round(history.metric_before, 6),
        "metric_after": round(history.metric_after, 6),
        "samples_train": len(data.train),
        "samples_heldout": len(data.heldout),
        "labels": data.labels is not None,
        "batched": data.batched,
        "interpreter_error": float(f"{data.interpreter_error:.3g}"),
        "tensors_trained": len(net.weights),
        "params_trained": int(sum(w.values.size for w in net.weights)),
        "threads": threads,
    }


def _changes(net: TorchGraph) -> list[LayerDecision]:
    """One decision per trained tensor, named after its first reader, with its relative change."""
    out = []
    for weight, param in zip(net.weights, net.params):
        old = weight.initial().astype(np.float64)
        new = param.detach().numpy().astype(np.float64)
        change = float(np.linalg.norm(new - old) / max(float(np.linalg.norm(old)), 1e-30))
        reader = weight.readers[0]
        out.append(LayerDecision(reader.name, reader.op, "rewritten", figures={
            "tensor": weight.name, "shape": list(weight.values.shape), "relative_change": round(change, 6)}))
    return out
