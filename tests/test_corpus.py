"""Acceptance: the onnx wheel's own test corpus comes out of dce and the default pipeline unchanged in outputs.

Every model of onnx/backend/test/data/{light,pytorch-converted,pytorch-operator,simple} that onnxruntime
can run is optimized and run again on its own test inputs (or seeded inputs where it ships none); outputs
must agree with the original's within rtol 1e-4, atol 1e-5.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nnopt.api import optimize
from nnopt.ir.model import load_model
from nnopt.plugin_manager import build_plugins
from nnopt.runtime import RuntimeUnavailable, generate_samples, make_session

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FOLDERS = ("light", "pytorch-converted", "pytorch-operator", "simple")


def _corpus() -> list[Path]:
    paths: list[Path] = []
    for folder in FOLDERS:
        paths += sorted(Path(p) for p in glob.glob(str(DATA / folder / "*" / "model.onnx")))
        paths += sorted(Path(p) for p in glob.glob(str(DATA / folder / "*.onnx")))
    return paths


def _inputs(path: Path, sess) -> dict[str, np.ndarray] | None:
    specs = sess.get_inputs()
    pbs = sorted(glob.glob(str(path.parent / "test_data_set_0" / "input_*.pb")))
    if pbs and len(pbs) == len(specs):
        feeds = {}
        for spec, pb in zip(specs, pbs):
            tensor = onnx.TensorProto()
            tensor.ParseFromString(Path(pb).read_bytes())
            feeds[spec.name] = numpy_helper.to_array(tensor)
        return feeds
    return generate_samples(sess, count=1, seed=0)[0]


def _assert_same(reference: list, outputs: list, where: str) -> None:
    assert len(reference) == len(outputs), where
    for i, (a, b) in enumerate(zip(reference, outputs)):
        if isinstance(a, np.ndarray):
            if a.dtype.kind in "fc":
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=f"{where}: output {i}")
            else:
                np.testing.assert_array_equal(b, a, err_msg=f"{where}: output {i}")
        else:
            assert type(a) is type(b), f"{where}: output {i}"


CORPUS = _corpus()
PLUGINS = build_plugins(load_entry_points=False)


def _ids(path: Path) -> str:
    rel = path.relative_to(DATA)
    return str(rel.parent if rel.name == "model.onnx" else rel.with_suffix(""))


@pytest.mark.parametrize("pipeline", [["dce"], None], ids=["dce", "default"])
@pytest.mark.parametrize("path", CORPUS, ids=[_ids(p) for p in CORPUS])
def test_corpus_model_keeps_its_outputs(path: Path, pipeline):
    proto = onnx.load(str(path))
    try:
        sess = make_session(proto)
    except RuntimeUnavailable as exc:  # the acceptance covers what onnxruntime can run
        pytest.skip(str(exc)[:160])
    feeds = _inputs(path, sess)
    try:
        reference = sess.run(None, feeds)
    except Exception as exc:  # onnxruntime's own error types: the original does not run
        pytest.skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}")
    model, report = optimize(load_model(path), pipeline, plugins=PLUGINS)
    out = model.to_proto()
    onnx.checker.check_model(out)
    new = make_session(out)
    _assert_same(reference, new.run(None, feeds), _ids(path))
    assert not any(r.status == "rolled_back" and "raised" in r.reason for r in report.passes), report.format_table()
    # Interface: same input and output names, in the same order. Before IR 4 every initializer is also
    # listed as an input; those are weights, and dead ones may go.
    def real_inputs(p: onnx.ModelProto) -> list[str]:
        weights = {t.name for t in p.graph.initializer} if p.ir_version < 4 else set()
        return [i.name for i in p.graph.input if i.name not in weights]

    assert real_inputs(out) == real_inputs(proto)
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    # Never grows the file by more than the bytes of names/metadata nnopt may rewrite.
    assert out.ByteSize() <= proto.ByteSize() + 1024, f"{_ids(path)} grew"


def test_corpus_is_present():
    assert len(CORPUS) > 100, "the onnx wheel's test corpus was not found"
    assert os.path.isdir(DATA / "light")
