"""Plugin discovery through the nnopt.plugins entry-point group, with broken plugins isolated by name."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from nnopt import hookimpl
from nnopt.errors import PassNotFoundError
from nnopt.pipeline.base import Pass, PassContext, PassResult
from nnopt.plugin_manager import BUILTIN, build_plugins, get_pass_class


class _Dist:
    def __init__(self, name: str) -> None:
        self.name = name


class _EntryPoint:
    """Stands in for importlib.metadata.EntryPoint: plugin loading is tested without installing."""

    def __init__(self, name: str, obj=None, error: BaseException | None = None) -> None:
        self.name = name
        self.dist = _Dist(f"{name}-dist")
        self._obj = obj
        self._error = error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


def _plugin_module(name: str, **hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(__name__=name, **hooks)


class HelloPass(Pass):
    """Test plugin pass: changes nothing."""

    name = "hello.noop"

    def run(self, model, ctx: PassContext) -> PassResult:
        return PassResult(modified=False)


class DceImpostor(HelloPass):
    name = "dce"


@hookimpl
def _register_hello():
    return [HelloPass]


@hookimpl
def _register_impostor():
    return [DceImpostor]


@hookimpl
def _register_raises():
    raise ValueError("plugin bug")


def _fake_entry_points(monkeypatch, eps):
    import nnopt.plugin_manager as pm_mod

    monkeypatch.setattr(pm_mod.importlib.metadata, "entry_points", lambda group: eps if group == "nnopt.plugins" else [])


def test_builtin_passes_register_through_the_hook():
    plugins = build_plugins(load_entry_points=False)
    assert plugins.passes["dce"].plugin == BUILTIN
    assert plugins.plugins[0].status == "loaded"


def test_good_and_broken_plugins(monkeypatch):
    eps = [
        _EntryPoint("hello", _plugin_module("hello", nnopt_register_passes=_register_hello)),
        _EntryPoint("broken-import", error=ImportError("No module named 'missing_dep'")),
        _EntryPoint("raises", _plugin_module("raises", nnopt_register_passes=_register_raises)),
        _EntryPoint("duplicate", _plugin_module("duplicate", nnopt_register_passes=_register_impostor)),
        _EntryPoint("typo", _plugin_module("typo", nnopt_register_pass=_register_hello)),
    ]
    _fake_entry_points(monkeypatch, eps)
    plugins = build_plugins()
    by_name = {p.name: p for p in plugins.plugins}
    assert by_name["hello"].status == "loaded"
    assert plugins.passes["hello.noop"].plugin == "hello-dist"
    assert by_name["broken-import"].status == "failed" and "missing_dep" in by_name["broken-import"].error
    assert by_name["raises"].status == "failed" and "plugin bug" in by_name["raises"].error
    assert by_name["duplicate"].status == "failed" and "already registered" in by_name["duplicate"].error
    assert plugins.passes["dce"].plugin == BUILTIN  # the built-in keeps its name
    assert by_name["typo"].status == "failed" and "nnopt_register_pass" in by_name["typo"].error


def test_no_plugins_environment_variable(monkeypatch):
    _fake_entry_points(monkeypatch, [_EntryPoint("hello", _plugin_module("hello", nnopt_register_passes=_register_hello))])
    monkeypatch.setenv("NNOPT_NO_PLUGINS", "1")
    plugins = build_plugins()
    assert "hello.noop" not in plugins.passes and "dce" in plugins.passes


def test_unknown_pass_suggests_the_closest_name():
    plugins = build_plugins(load_entry_points=False)
    with pytest.raises(PassNotFoundError, match="did you mean 'dce'"):
        get_pass_class(plugins, "dcee")


def test_example_plugin_distribution_through_an_entry_point(monkeypatch, capsys):
    """The example in plugins/ found as an installed distribution would be, listed by `nnopt plugins`."""
    import json
    import sys
    from pathlib import Path

    from nnopt.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "plugins" / "nnopt-example-plugin"))
    import nnopt_example_plugin

    ep = _EntryPoint("example", nnopt_example_plugin)
    ep.dist = _Dist("nnopt-example-plugin")
    _fake_entry_points(monkeypatch, [ep])
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["plugins"]}
    assert rows["example"]["distribution"] == "nnopt-example-plugin"
    assert rows["example"]["passes"] == ["example.cancel-transposes", "example.strip-doc-strings"]
    assert main(["--no-plugins", "plugins", "--json"]) == 0
    assert "example" not in {r["name"] for r in json.loads(capsys.readouterr().out)["plugins"]}
    sys.modules.pop("nnopt_example_plugin", None)


def test_the_installed_example_plugin_is_found_listed_and_used_in_a_pipeline(tmp_path, capsys):
    """No fakes: the distribution pip installed (the README's test command does) and its real entry point."""
    import importlib.metadata
    import json

    import onnx

    from nnopt.cli import main
    from nnopt.testing import model_from_text

    try:
        dist = importlib.metadata.distribution("nnopt-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the example plugin is not installed: pip install ./plugins/nnopt-example-plugin (see README)")
    assert [ep.value for ep in dist.entry_points if ep.group == "nnopt.plugins"] == ["nnopt_example_plugin"]

    assert main(["passes", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["passes"]}
    assert listed["example.cancel-transposes"]["plugin"] == "nnopt-example-plugin"

    # NCHW → NHWC, Relu, back: the pair cancels and the Relu stays, inside a pipeline file.
    src, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save_model(model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 4, 5] x) => (float[1, 3, 4, 5] y) {
          a = Transpose<perm = [0, 2, 3, 1]>(x)
          b = Relu(a)
          c = Transpose<perm = [0, 3, 1, 2]>(b)
          y = Sigmoid(c)
        }
    """), str(src))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[[passes]]\nname = "default"\n\n[[passes]]\nname = "example.cancel-transposes"\n')
    assert main(["optimize", str(src), "-o", str(out), "--pipeline", str(pipeline), "--report", str(report), "-q"]) == 0
    record = [r for r in json.loads(report.read_text())["passes"] if r["name"] == "example.cancel-transposes"][0]
    assert record["status"] == "applied" and record["stats"]["transposes_removed"] == 2
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Relu", "Sigmoid"]
    # --no-plugins: the pass is gone, and asking for it is a one-line error, exit 2.
    assert main(["--no-plugins", "optimize", str(src), "-o", str(tmp_path / "x.onnx"), "-p", "example.cancel-transposes"]) == 2
    assert "unknown pass 'example.cancel-transposes'" in capsys.readouterr().err


def test_a_plugin_that_exits_at_import_or_in_a_hook_is_reported_not_obeyed(monkeypatch, tmp_path, capsys):
    from nnopt.cli import main

    @hookimpl
    def _register_exits():
        raise SystemExit(0)

    _fake_entry_points(monkeypatch, [
        _EntryPoint("exits-at-import", error=SystemExit(0)),
        _EntryPoint("exits-in-hook", _plugin_module("exits", nnopt_register_passes=_register_exits)),
    ])
    by_name = {p.name: p for p in build_plugins().plugins}
    assert by_name["exits-at-import"].status == "failed"
    assert by_name["exits-at-import"].error == "import failed: SystemExit: 0"
    assert by_name["exits-in-hook"].status == "failed" and "raised SystemExit" in by_name["exits-in-hook"].error
    out = tmp_path / "out.onnx"
    example = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
    assert main(["optimize", str(example), "-o", str(out), "-q"]) == 0
    assert out.exists()  # nnopt went on without the plugins, and said why
    assert "plugin exits-at-import (exits-at-import-dist) not loaded: import failed: SystemExit: 0" in capsys.readouterr().err


def test_nnopt_plugins_lists_each_plugins_passes_cost_rules_profiles_and_version(capsys, monkeypatch):
    """The installed example distribution, through its real entry point: everything it registered, by name."""
    import importlib.metadata
    import json

    from nnopt import __version__
    from nnopt.cli import main

    version = importlib.metadata.version("nnopt-example-plugin")
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["plugins"]}
    assert rows["example"] == {
        "name": "example",
        "distribution": "nnopt-example-plugin",
        "version": version,
        "status": "loaded",
        "error": "",
        "passes": ["example.cancel-transposes", "example.strip-doc-strings"],
        "cost_rules": ["com.example:FancyOp"],
        "hardware": ["example-npu"],
    }
    builtin = rows["nnopt.passes"]
    assert builtin["version"] == __version__ and builtin["hardware"] == ["cortex-m7", "jetson-nano", "rpi4", "x86-avx2-2core"]
    assert "Conv" in builtin["cost_rules"] and "com.example:FancyOp" not in builtin["cost_rules"]

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("example  ("):]
    assert block.splitlines() == [
        f"example  (nnopt-example-plugin, version {version})  loaded",
        "    passes: example.cancel-transposes, example.strip-doc-strings",
        "    cost rules: com.example:FancyOp",
        "    hardware profiles: example-npu",
    ]
    assert f"nnopt.passes  (nnopt (built-in), version {__version__})  loaded" in text
    assert f"    cost rules: {len(builtin['cost_rules'])} (nnopt plugins --json lists them)" in text
    assert max(len(line) for line in text.splitlines()) <= 79


def test_a_failed_plugin_is_listed_with_its_problem_and_nothing_registered(monkeypatch, capsys):
    from nnopt.cli import main

    _fake_entry_points(monkeypatch, [_EntryPoint("broken", error=ImportError("No module named 'missing_dep'"))])
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken  (broken-dist)  failed\n    problem: import failed: No module named 'missing_dep'" in out
