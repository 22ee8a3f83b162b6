"""The distill pass's training loop: losses against the teacher's outputs, early stopping on a held-out split."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from nnopt.passes._torch_graph import TorchGraph

#: How an output is compared with the teacher's: class scores as logits, probabilities (a Softmax) or
#: log-probabilities (a LogSoftmax) along ``axis`` get a KL divergence at a temperature; anything else MSE.
OutputKind = Literal["logits", "probs", "logprobs", "values"]
#: Probabilities are floored here before their log: softmax(log p / T) is softmax(z / T) for p = softmax(z).
_PROB_FLOOR = 1e-12


@dataclass(frozen=True)
class Target:
    kind: OutputKind
    axis: int = -1


@dataclass(frozen=True)
class Settings:
    """What the loop needs of the pass's options."""

    epochs: int
    max_seconds: float
    lr: float
    temperature: float
    batch_size: int
    patience: int
    label_weight: float
    threads: int
    seed: int


@dataclass
class Data:
    """Inputs and teacher outputs as tensors, one entry per sample (batch axis first), and the split."""

    feeds: list[dict[str, torch.Tensor]]
    teacher: list[list[torch.Tensor]]
    labels: torch.Tensor | None
    train: np.ndarray
    heldout: np.ndarray
    batched: bool = False  # whether samples may be concatenated into one forward run
    interpreter_error: float = 0.0  # the interpreter's relative error against onnxruntime, once checked


@dataclass
class History:
    """What training did: the loss curve, the held-out metric before and after, and why it stopped."""

    metric: str
    metric_before: float
    metric_after: float = float("nan")
    train_loss: list[float] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)  # [0] is before training
    best_epoch: int = 0
    stopped_by: str = "epochs"
    seconds: float = 0.0


@contextlib.contextmanager
def deterministic(threads: int, seed: int) -> Iterator[None]:
    """Pin torch's threads, deterministic kernels and RNG for the block, and restore them afterwards.

    The thread count is part of the result: the same seed on 1 and on 2 threads gives different bytes.
    """
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(saved_threads)
            torch.use_deterministic_algorithms(saved_deterministic)


def forward(net: TorchGraph, data: Data, index: np.ndarray) -> list[torch.Tensor]:
    """The net's outputs on samples ``index``, concatenated along the batch axis."""
    if data.batched:
        names = data.feeds[0].keys()
        return net({n: torch.cat([data.feeds[i][n] for i in index]) for n in names})
    per_sample = [net(data.feeds[i]) for i in index]
    return [torch.cat([outs[k] for outs in per_sample]) for k in range(len(per_sample[0]))]


def teacher(data: Data, index: np.ndarray) -> list[torch.Tensor]:
    return [torch.cat([data.teacher[i][k] for i in index]) for k in range(len(data.teacher[0]))]


def _logits(y: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    return torch.log(torch.clamp(y, min=_PROB_FLOOR)) if kind == "probs" else y


def loss(
    outs: list[torch.Tensor], ref: list[torch.Tensor], targets: list[Target], labels: torch.Tensor | None,
    settings: Settings,
) -> torch.Tensor:
    """Mean over outputs of KL(teacher ‖ student)·T² (class scores) or MSE / mean(teacher²) (other outputs),
    mixed with a cross-entropy on the labels (weight ``label_weight``) for the first class-score output."""
    t = settings.temperature
    terms = []
    for y, r, target in zip(outs, ref, targets):
        if target.kind == "values":
            terms.append(F.mse_loss(y, r) / (r.pow(2).mean() + 1e-12))
            continue
        student = F.log_softmax(_logits(y, target.kind) / t, dim=target.axis)
        soft = F.softmax(_logits(r, target.kind) / t, dim=target.axis)
        kl = (soft * (torch.log(torch.clamp(soft, min=_PROB_FLOOR)) - student)).sum(dim=target.axis)
        terms.append(kl.mean() * t * t)
    total = torch.stack(terms).mean()
    scored = _scored(targets)
    if labels is None or scored is None or settings.label_weight == 0:
        return total
    ce = F.cross_entropy(_logits(outs[scored], targets[scored].kind), labels)
    return (1 - settings.label_weight) * total + settings.label_weight * ce


def _scored(targets: list[Target]) -> int | None:
    """The first class-score output: the one the metric and the labels are about."""
    return next((i for i, t in enumerate(targets) if t.kind != "values"), None)


def metric(net: TorchGraph, data: Data, targets: list[Target]) -> tuple[str, float]:
    """The held-out metric: accuracy with labels, else top-1 agreement with the teacher, else the relative
    error of the outputs (when no output is class scores)."""
    index = data.heldout
    with torch.no_grad():
        outs, ref = forward(net, data, index), teacher(data, index)
    scored = _scored(targets)
    if scored is None:
        err = sum(float(((y - r) ** 2).sum() / ((r**2).sum() + 1e-12)) for y, r in zip(outs, ref)) / len(outs)
        return "relative_error", err
    axis = targets[scored].axis
    top = outs[scored].argmax(dim=axis)
    if data.labels is not None:
        return "accuracy", float((top == data.labels[torch.from_numpy(index)]).float().mean())
    return "top1_agreement", float((top == ref[scored].argmax(dim=axis)).float().mean())


def _heldout_loss(net: TorchGraph, data: Data, targets: list[Target], settings: Settings) -> float:
    index = data.heldout
    labels = None if data.labels is None else data.labels[torch.from_numpy(index)]
    with torch.no_grad():
        return float(loss(forward(net, data, index), teacher(data, index), targets, labels, settings))


def train(
    net: TorchGraph, data: Data, targets: list[Target], settings: Settings, rng: np.random.Generator,
    on_epoch: Callable[[int], None] | None = None,
) -> History:
    """Adam on the net's parameters; keeps (restores) the parameters of the best held-out loss.

    Batches follow ``rng`` (a fresh permutation of the training split per epoch), so the run is
    deterministic for a seed and a thread count, unless ``max_seconds`` cuts it short.
    """
    started = time.perf_counter()
    name, before = metric(net, data, targets)
    history = History(name, before, heldout_loss=[round(_heldout_loss(net, data, targets, settings), 6)])
    best, best_state, stale = history.heldout_loss[0], net.snapshot(), 0
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    for epoch in range(1, settings.epochs + 1):
        total, seen = 0.0, 0
        order = data.train[rng.permutation(len(data.train))]
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size]
            labels = None if data.labels is None else data.labels[torch.from_numpy(index)]
            optimizer.zero_grad()
            value = loss(forward(net, data, index), teacher(data, index), targets, labels, settings)
            value.backward()
            optimizer.step()
            total, seen = total + float(value.detach()) * len(index), seen + len(index)
            if time.perf_counter() - started > settings.max_seconds:
                history.stopped_by = "max_seconds"
                break
        history.train_loss.append(round(total / max(seen, 1), 6))
        held = _heldout_loss(net, data, targets, settings)
        history.heldout_loss.append(round(held, 6))
        if on_epoch is not None:
            on_epoch(epoch)
        if held < best:
            best, best_state, stale, history.best_epoch = held, net.snapshot(), 0, epoch
        else:
            stale += 1
        if history.stopped_by == "max_seconds":
            break
        if stale >= settings.patience:
            history.stopped_by = "patience"
            break
    net.restore(best_state)
    history.metric_after = metric(net, data, targets)[1]
    history.seconds = round(time.perf_counter() - started, 3)
    return history
