"""Train a small CNN on scikit-learn's digits and export it, with its held-out test split, for nnopt.

Needs torch for training only (nnopt itself never imports it)::

    pip install torch==2.13.0          # the exact pin: a CPU wheel; other versions pull a CUDA build
    python examples/digits/train_digits_cnn.py [--out-dir examples/digits]

The network (BatchNorms deliberately left unfused in the export, so the default pipeline has work)::

    x[N,1,8,8] → Conv3x3(1→32) → BN → Relu → Conv3x3(32→64) → BN → Relu → MaxPool2x2   (→ 64×4×4)
               → Conv3x3(64→128) → BN → Relu → GlobalAveragePool → Flatten           (→ 128)
               → Gemm(128→128) → Relu → Gemm(128→10) → logits[N,10]

Input scaling: ``load_digits().images`` holds pixel intensities 0..16; the model takes ``pixel / 16``
(float32 in [0, 1]), shaped [N, 1, 8, 8].

Data: a stratified split ``train_test_split(images, labels, test_size=0.25, random_state=0,
stratify=labels)`` — 1,347 training and 450 test images. Writes into ``--out-dir``:

- ``digits_cnn.onnx``: opset 17, input ``x`` with a dynamic batch dim, output ``logits``;
- ``digits_test.npz``: only ``x`` (the 450 test images), so it is also an nnopt ``--data`` file;
- ``digits_test_labels.npy``: the 450 test labels (int64), kept apart because ``--data`` files may only
  hold model inputs.

Seeds are fixed and torch runs single-threaded with deterministic algorithms, so a re-run writes the
same bytes (checked on the machine this was developed on: 2-core x86-64, torch 2.13.0+cpu).
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 40
BATCH = 64


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): images as float32 [N, 1, 8, 8] in [0, 1], labels int64."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def build_net() -> nn.Sequential:
    return nn.Sequential(
        *conv_bn_relu(1, 32),
        *conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def train(x: np.ndarray, y: np.ndarray) -> nn.Sequential:
    """Adam with a one-cycle learning-rate schedule; the shuffling generator is seeded like the weights."""
    torch.manual_seed(SEED)
    net = build_net()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = EPOCHS * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad()
            loss_fn(net(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    return net.eval()


def export(net: nn.Sequential) -> bytes:
    """ONNX bytes of the eval-mode net, BatchNorms kept as nodes.

    ``do_constant_folding=False`` is what keeps them: the TorchScript exporter folds Conv+BN only inside
    its constant-folding step.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (dynamo=False); its deprecation notice is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, 8, 8),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=False,
        )
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x_train, x_test, y_train, y_test = load_split()
    started = time.perf_counter()
    net = train(x_train, y_train)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_cnn.onnx").write_bytes(export(net))
    np.savez(out / "digits_test.npz", x=x_test)
    np.save(out / "digits_test_labels.npy", y_test)
    print(f"trained in {seconds:.1f}s on {len(x_train)} images; test accuracy {accuracy:.4f} "
          f"({int(round(accuracy * len(y_test)))}/{len(y_test)}); wrote {out}")


if __name__ == "__main__":
    main()
