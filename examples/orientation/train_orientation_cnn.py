"""Train a small VGG-style CNN that tells the orientation of rendered text (0/90/180/270°) and export it for nnopt.

Needs torch for training only (nnopt itself never imports it) and Pillow for rendering::

    pip install torch==2.13.0 pillow   # the exact torch pin: a CPU wheel; other versions pull a CUDA build
    python examples/orientation/train_orientation_cnn.py [--out-dir examples/orientation]

The data are labelled by construction (``benchmarks/datasets.py``, ``orientation_crops``): 32×32 crops of
blocks of pseudo-English words drawn with one of six DejaVu fonts at 9–16 px, turned by 0/90/180/270°
counter-clockwise (labels 0..3), bright text on a dark ground of random contrast with a little noise,
8-bit levels. The words of the training, calibration and test splits come from disjoint pools (a hash of
each word) and their renderings from different random streams.

The network (BatchNorms left unfused in the export, as in ``examples/digits``)::

    x[N,1,32,32] → [Conv3x3 → BN → Relu] ×2 (1→16→16)  → MaxPool2x2   (→ 16×16×16)
                 → [Conv3x3 → BN → Relu] ×2 (16→32→32) → MaxPool2x2   (→ 32×8×8)
                 → [Conv3x3 → BN → Relu] ×2 (32→64→64) → MaxPool2x2   (→ 64×4×4)
                 → Flatten → Gemm(1024→64) → Relu → Gemm(64→4) → logits[N,4]

Writes into ``--out-dir``: ``orientation_cnn.onnx`` (opset 17, input ``x`` with a dynamic batch dim,
output ``logits``), ``orientation_test.npz`` (only ``x``, so it is also an nnopt ``--data`` file; stored
compressed) and ``orientation_test_labels.npy`` (int64). Seeds are fixed and torch runs single-threaded
with deterministic algorithms, as in ``examples/digits``; the rendered crops are reproduced exactly (font
rasterising may differ with another Pillow/FreeType build).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))

from datasets import orientation_crops  # noqa: E402

SEED = 0
EPOCHS = 15
BATCH = 64
TRAIN = 16000
TEST = 800


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def build_net() -> nn.Sequential:
    return nn.Sequential(
        *conv_bn_relu(1, 16), *conv_bn_relu(16, 16), nn.MaxPool2d(2),
        *conv_bn_relu(16, 32), *conv_bn_relu(32, 32), nn.MaxPool2d(2),
        *conv_bn_relu(32, 64), *conv_bn_relu(64, 64), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
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
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad()
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / len(x):.4f}", flush=True)
    return net.eval()


def export(net: nn.Sequential) -> bytes:
    """ONNX bytes of the eval-mode net, BatchNorms kept as nodes (``do_constant_folding=False`` keeps them)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (dynamo=False); its deprecation notice is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (torch.zeros(1, 1, 32, 32),),
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

    started = time.perf_counter()
    train_x, train_y = orientation_crops(TRAIN, "train", seed=SEED)
    test_x, test_y = orientation_crops(TEST, "test", seed=SEED)
    print(f"rendered {TRAIN} + {TEST} crops in {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    net = train(train_x["x"], train_y)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(test_x["x"])).argmax(1).numpy() == test_y).mean())

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "orientation_cnn.onnx").write_bytes(export(net))
    np.savez_compressed(out / "orientation_test.npz", **test_x)
    np.save(out / "orientation_test_labels.npy", test_y)
    print(f"trained in {seconds:.1f}s on {TRAIN} crops; test accuracy {accuracy:.4f} "
          f"({int(round(accuracy * TEST))}/{TEST}); wrote {out}")


if __name__ == "__main__":
    main()
