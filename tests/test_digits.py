"""The committed digits CNN (examples/digits): real test accuracy, kept exactly by the default pipeline.

The model was trained by examples/digits/train_digits_cnn.py (torch, training only; not needed here):

    x[N,1,8,8] → Conv3x3(1→32) → BN → Relu → Conv3x3(32→64) → BN → Relu → MaxPool
               → Conv3x3(64→128) → BN → Relu → GlobalAveragePool → Flatten → Gemm(128→128) → Relu
               → Gemm(128→10) → logits
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.plugin_manager import build_plugins
from nnopt.runtime import load_samples, make_session

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODEL = DIGITS / "digits_cnn.onnx"
DATA = DIGITS / "digits_test.npz"
LABELS = DIGITS / "digits_test_labels.npy"


def _predict(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    return make_session(model).run(None, {"x": x})[0].argmax(axis=1)


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA) as npz:
        assert npz.files == ["x"]  # a valid nnopt --data file holds model inputs only
        x = npz["x"]
    return x, np.load(LABELS)


def test_committed_files_are_what_the_training_script_documents(split):
    x, y = split
    # train_test_split(test_size=0.25, stratify=y) of 1,797 images: 450 test images, every class present.
    assert x.shape == (450, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (450,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
    # Pixels are scaled by 1/16 (sklearn's digits are 0..16): values are multiples of 1/16 in [0, 1].
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(x * 16, np.round(x * 16))
    proto = onnx.load(str(MODEL))
    onnx.checker.check_model(proto, full_check=True)
    assert MODEL.stat().st_size < 1_000_000
    assert [i.name for i in proto.graph.input] == ["x"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 3 and ops.count("BatchNormalization") == 3 and ops.count("Gemm") == 2


def test_real_test_accuracy(split):
    x, y = split
    accuracy = float(np.mean(_predict(MODEL, x) == y))
    print(f"digits CNN test accuracy: {accuracy:.4f} ({int(round(accuracy * len(y)))}/{len(y)})")
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(446 / 450)  # what the training script reported


def test_default_pipeline_keeps_every_prediction_and_folds_the_batchnorms(split):
    x, y = split
    before = analyze(MODEL).totals
    model, report = optimize(MODEL, None, data=DATA, plugins=build_plugins(load_entry_points=False))
    proto = model.to_proto()
    after = analyze(proto).totals

    assert report.rolled_back == []
    assert report.verification == "onnxruntime"
    assert report.fidelity is not None and report.fidelity["samples"] == 450  # one sample per test image
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 2
    # Folding three BNs removes their 4 × (32 + 64 + 128) = 896 parameters and their elementwise FLOPs
    # (2 × C × H × W each: 2 × (32·64 + 64·64 + 128·16) = 16,384).
    assert before["params"] - after["params"] == 896
    assert before["flops"] - after["flops"] == 16_384
    assert after["macs"] == before["macs"]

    original, optimized = _predict(MODEL, x), _predict(proto, x)
    assert np.array_equal(optimized, original)  # same predictions, so exactly the same accuracy
    assert float(np.mean(optimized == y)) == float(np.mean(original == y))


def test_test_split_is_a_valid_data_file():
    samples = load_samples(DATA, make_session(MODEL))
    assert len(samples) == 450
    assert samples[0]["x"].shape == (1, 1, 8, 8)


def _load_benchmark(monkeypatch: pytest.MonkeyPatch) -> Any:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compression.py"
    spec = importlib.util.spec_from_file_location("compression_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_compression_benchmark_measures_the_digits_cnn(tmp_path, monkeypatch):
    """benchmarks/compression.py on the digits CNN: real figures for what runs, a row for what is missing."""
    bench = _load_benchmark(monkeypatch)
    out = tmp_path / "compression"
    argv = ["--models", "digits", "--settings", "default", "default+no-such-pass:bits=4",
            "--runs", "2", "--rounds", "1", "--out", str(out)]
    assert bench.main(argv) == 0

    result = json.loads(out.with_suffix(".json").read_text())
    assert result["machine"]["cores"] == os.cpu_count()
    (digits,) = result["models"]
    original, (default, missing) = digits["original"], digits["settings"]
    assert original["params"] == 111_370 and original["flops"] == 4_821_632
    assert original["accuracy"] == pytest.approx(446 / 450)
    assert default["status"] == "applied"
    assert (default["params"], default["flops"]) == (110_474, 4_805_248)
    assert default["accuracy"] == original["accuracy"] and default["top1_agreement"] == 1.0
    assert default["cosine_similarity"] > 0.999999 and default["max_rel_error"] < 1e-5
    assert default["bytes"] < original["bytes"] and default["latency_ratio"] > 0
    assert missing["status"] == "not available"
    assert missing["notes"] == ["pass not registered yet: no-such-pass"]
    table = out.with_suffix(".md").read_text()
    assert "| `default` | applied | 443.8 (0.991) |" in table
    assert "| `default+no-such-pass:bits=4` | not available |" in table
    # --render rewrites the table from the JSON alone, the same as the run wrote it.
    out.with_suffix(".md").unlink()
    assert bench.main(["--render", str(out.with_suffix(".json"))]) == 0
    assert out.with_suffix(".md").read_text() == table


@pytest.mark.slow
def test_compression_benchmark_on_a_real_model(tmp_path, monkeypatch):
    """The benchmark on a real model (PP-OCR's direction classifier: weights in Constant nodes)."""
    from realmodels import REAL_MODELS

    if next(m for m in REAL_MODELS if m.key == "ppocr_cls").path() is None:
        pytest.skip("rapidocr-onnxruntime is not installed (pip install --no-deps -r tests/real-models.txt)")
    bench = _load_benchmark(monkeypatch)
    out = tmp_path / "compression"
    assert bench.main(["--models", "ppocr_cls", "--settings", "default", "--runs", "2", "--rounds", "1",
                       "--out", str(out)]) == 0
    (cls,) = json.loads(out.with_suffix(".json").read_text())["models"]
    original, (default,) = cls["original"], cls["settings"]
    # Rendered text lines (the per-model default of REAL_SAMPLES), not N(0, 1): 128 of the test split.
    assert cls["samples"] == 128 and original["params"] == 133_700
    assert cls["inputs"].startswith("rendered text lines, 48x192")
    assert f"Inputs: {cls['inputs']}." in out.with_suffix(".md").read_text()
    # The default pipeline turns the Constant-node weights into initializers and folds the BatchNorms.
    assert default["status"] == "applied" and default["params"] < original["params"]
    assert default["flops"] < original["flops"] and default["bytes"] < original["bytes"]
    assert default["top1_agreement"] == 1.0 and default["cosine_similarity"] > 0.99999


@pytest.mark.slow
def test_compression_benchmark_feeds_real_models_rendered_inputs(tmp_path, monkeypatch):
    """ppocr_cls's --data are rendered text lines of the calibration split (RapidOCR's preprocessing: values
    in [-1, 1], paper grey on most pixels, zeros right of a short line), evaluated on other lines; with
    ``rendered=False`` (benchmarks/peers.py) it still gets seeded N(0, 1) inputs."""
    from realmodels import REAL_MODELS

    if next(m for m in REAL_MODELS if m.key == "ppocr_cls").path() is None:
        pytest.skip("rapidocr-onnxruntime is not installed (pip install --no-deps -r tests/real-models.txt)")
    bench = _load_benchmark(monkeypatch)
    (model,), skipped = bench.resolve_models(["ppocr_cls"], tmp_path, None, None, rendered=True)
    assert skipped == [] and model.input_shapes == {"x": [1, 3, 48, 192]}
    assert model.inputs == ("rendered text lines, 48x192, 0/180 degrees: 32 of the calibration split as --data, "
                            "128 of the test split evaluated")
    with np.load(model.data) as npz:
        data = npz["x"]
    with np.load(model.eval_data) as npz:
        evaluated = npz["x"]
    assert data.shape == (32, 3, 48, 192) and evaluated.shape == (128, 3, 48, 192)
    for x in (data, evaluated):
        assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
        # Grey lines: the three channels are equal; paper (190..255 -> 0.49..1) covers most of a line.
        assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
        assert np.mean(x > 0.45) > 0.5
    # A line narrower than 192 px is padded with zeros on the right, as RapidOCR pads.
    assert np.any(np.all(data[:, :, :, -1] == 0.0, axis=(1, 2)))
    # No evaluated line is one of the calibration lines.
    assert not any(np.array_equal(e, d) for e in evaluated for d in data)
    # The builders are deterministic: the same lines again.
    (tmp_path / "again").mkdir()
    (again,), _ = bench.resolve_models(["ppocr_cls"], tmp_path / "again", None, None, rendered=True)
    with np.load(again.data) as npz:
        assert np.array_equal(npz["x"], data)

    (noise,), _ = bench.resolve_models(["ppocr_cls"], tmp_path, 3, 4)
    with np.load(noise.data) as npz:
        generated = npz["x"]
    assert generated.shape[0] == 3 and generated.min() < -2.0 and abs(float(generated.mean())) < 0.1
    assert noise.inputs.startswith("seeded N(0, 1) inputs: 3 as --data")
