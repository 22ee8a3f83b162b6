"""Helpers for testing passes, nnopt's own and plugins': tiny models from ONNX text, runs, contract checks.

What a plugin's tests need, all from this public module:

- build a model: ``model_from_text``; run it: ``run``, ``random_feeds``; read it: ``op_types``;
- run a pass alone (``apply_pass``) or check it is lossless and deterministic (``assert_lossless``);
- run a pass through the checked pipeline the CLI runs (``run_checked``), and hold a lossy pass to a budget
  (``assert_within_budget``);
- cost a node with a plugin's cost rules (``node_cost``);
- check that an installed distribution is discovered through its entry point (``assert_plugin_discovered``).

The ``assert_*`` helpers raise ``AssertionError`` with a message saying what was wrong (also under
``python -O``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.parser

from nnopt.cost.rules import CostRule
from nnopt.ir.model import Model
from nnopt.pipeline.base import Pass, PassContext, PassResult
from nnopt.pipeline.manager import Budget, PassRecord
from nnopt.plugin_manager import PluginInfo, Plugins
from nnopt.runtime import DataSource, feeds_for, generate_samples, load_samples, make_session

#: Generated samples ``assert_within_budget`` judges on without data (as many as a budget run generates).
BUDGET_SAMPLES = 16


def model_from_text(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Parse a model in ONNX text syntax and attach ``initializers`` (name → array)."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto)
    return proto


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    """Outputs of ``proto`` in onnxruntime (graph optimisations off); float values are cast to the float type
    of the input they feed (a model a pass gave float16 inputs), as the pass manager's verification does."""
    session = make_session(proto)
    return session.run(None, feeds_for(session, feeds))


def random_feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return generate_samples(make_session(proto), count=1, seed=seed)[0]


def apply_pass(pass_: Pass, proto: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass directly (no manager) on a copy of ``proto``; return the result model and report."""
    model = Model.from_proto(proto)
    result = pass_.run(model, ctx or PassContext())
    return model.to_proto(), result


def assert_lossless(pass_: Pass, proto: onnx.ModelProto, *, rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0) -> tuple[onnx.ModelProto, PassResult]:
    """Apply the pass, check the result with the onnx checker and compare outputs in onnxruntime.

    Also checks determinism: a second run on the same input gives byte-identical output.
    """
    out, result = apply_pass(pass_, proto)
    onnx.checker.check_model(out)
    feeds = random_feeds(proto, seed)
    for a, b in zip(run(proto, feeds), run(out, feeds)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
    again, _ = apply_pass(type(pass_)(pass_.options), proto)
    assert again.SerializeToString() == out.SerializeToString(), f"pass {pass_.name} is not deterministic"
    return out, result


def run_checked(
    pass_: Pass,
    proto: onnx.ModelProto,
    *,
    data: DataSource | None = None,
    budget: Budget | None = None,
    seed: int = 0,
    strict: bool = True,
    plugins: Plugins | None = None,
) -> tuple[onnx.ModelProto, PassRecord]:
    """Run one pass as ``nnopt optimize -p`` runs it: through the pass manager, which checks the result
    (the onnx checker, shape inference, onnxruntime on ``data`` or generated inputs, the lossless
    tolerance or ``budget``) and costs it. Returns the model after it and the pass's record (``status``,
    ``fidelity``, ``stats``, ``layers``, ``before``/``after`` cost).

    With ``strict`` (the default), a pass the manager rolls back raises ``nnopt.PassFailedError`` naming
    why, so the test fails with what a user would see; ``strict=False`` returns the rolled-back record.
    ``plugins`` defaults to the installed ones (their cost rules cost the model); the pass itself need not
    be registered.
    """
    from nnopt.api import Pipeline

    pipeline = Pipeline([pass_], data=data, budget=budget or Budget(), seed=seed, strict=strict, fixed_point=False)
    model, report = pipeline.run(proto, plugins=plugins)
    [record] = report.passes
    return model.to_proto(), record


def assert_within_budget(
    pass_: Pass,
    proto: onnx.ModelProto,
    budget: Budget,
    *,
    data: DataSource | None = None,
    seed: int = 0,
    plugins: Plugins | None = None,
) -> tuple[onnx.ModelProto, PassRecord]:
    """Assert that a lossy pass, run through the checked pipeline under ``budget``, is applied (not rolled
    back, not a no-op) and that its outputs stay within the budget, measured here again in onnxruntime
    against ``proto`` on ``data`` (or on 16 generated samples, as a budget run without data is judged),
    independently of the pass manager's own check. Returns what ``run_checked`` returns."""
    from nnopt.pipeline.verify import compare_outputs

    if not budget.is_set:
        raise ValueError("assert_within_budget needs a budget with at least one limit")
    out, record = run_checked(pass_, proto, data=data, budget=budget, seed=seed, strict=False, plugins=plugins)
    if record.status != "applied":
        raise AssertionError(f"pass {pass_.name} was {record.status}, not applied: {record.reason or 'no reason'}")
    session = make_session(proto)
    samples = (load_samples(data, session) if data is not None
               else generate_samples(session, count=BUDGET_SAMPLES, seed=seed))
    fidelity = compare_outputs([run(proto, s) for s in samples], [run(out, s) for s in samples])
    problem = budget.violation(fidelity)
    if problem is not None:
        raise AssertionError(f"pass {pass_.name}: {problem} (measured on {len(samples)} samples)")
    return out, record


def node_cost(
    proto: onnx.ModelProto,
    rules: Sequence[CostRule] = (),
    *,
    node: str | None = None,
    input_shapes: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The cost model's record of one node (named ``node``, or the model's only node) with ``rules`` added
    to the built-in ones, as a plugin's ``nnopt_register_cost_rules`` adds them: ``macs``, ``flops``,
    ``params``, ``costed``, ... Shapes come from the model (a custom op's output needs its value_info) and
    ``input_shapes``; the model is not run, so ops onnxruntime cannot run are fine."""
    from nnopt.cost.analysis import analyze
    from nnopt.cost.rules import default_registry

    registry = default_registry()
    for rule in rules:
        registry.register(rule)
    report = analyze(proto, rules=registry, input_shapes=input_shapes, run_onnxruntime=False)
    records = [r for r in report.nodes if node is None or r["name"] == node]
    if len(records) != 1:
        names = [r["name"] for r in report.nodes]
        raise ValueError(f"node_cost: {'no node named ' + repr(node) if node else 'more than one node'} (nodes: {names})")
    return records[0]


def assert_plugin_discovered(
    distribution: str,
    *,
    passes: Sequence[str] = (),
    cost_rules: Sequence[str] = (),
    hardware: Sequence[str] = (),
) -> PluginInfo:
    """Assert that the installed ``distribution`` is found through its ``nnopt.plugins`` entry point, as
    the CLI finds it, loads without a problem, and registers at least ``passes``, ``cost_rules`` (by
    ``CostRule.label``: ``Conv``, ``com.example:FancyOp``) and ``hardware`` profile names. Returns what
    ``nnopt plugins`` lists for it."""
    from nnopt.plugin_manager import NO_PLUGINS_ENV, build_plugins, plugins_disabled_by_env

    if plugins_disabled_by_env():
        raise AssertionError(f"{NO_PLUGINS_ENV} is set: no entry point is loaded")
    found = [p for p in build_plugins().plugins if p.distribution == distribution]
    if not found:
        raise AssertionError(f"no nnopt.plugins entry point of a distribution named {distribution!r}: is it "
                             "installed (pip install . after nnopt), with the entry point in its pyproject.toml?")
    [info] = found
    if info.status != "loaded" or info.error:
        raise AssertionError(f"plugin {info.name} ({distribution}) {info.status}: {info.error}")
    for what, wanted, got in (("passes", passes, info.passes), ("cost rules", cost_rules, info.cost_rules),
                              ("hardware profiles", hardware, info.hardware)):
        missing = [name for name in wanted if name not in got]
        if missing:
            raise AssertionError(f"plugin {info.name} ({distribution}) registers no {what} {missing}; it has {got}")
    return info


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]
