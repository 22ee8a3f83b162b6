"""The Python API behind the CLI: optimize and analyze a model in one call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx

from nnopt.ir.model import Model, load_model
from nnopt.pipeline.base import Pass, PassContext
from nnopt.pipeline.manager import Budget, PassManager, PipelineReport
from nnopt.pipeline.spec import DEFAULT_PIPELINE, instantiate, parse_pass_spec
from nnopt.pipeline.verify import Verifier
from nnopt.plugin_manager import Plugins, build_plugins, get_pass_class

PassSpec = str | Pass | tuple[str, dict[str, Any]]


def build_passes(specs: Sequence[PassSpec] | None, plugins: Plugins) -> tuple[list[Pass], bool]:
    """Resolve specs into pass instances; None means the default pipeline. Also says if it is lossless."""
    if specs is None:
        names = [n for n in DEFAULT_PIPELINE if n in plugins.passes]
        passes = [get_pass_class(plugins, n)() for n in names]
    else:
        passes = []
        for spec in specs:
            if isinstance(spec, Pass):
                passes.append(spec)
                continue
            name, values = parse_pass_spec(spec) if isinstance(spec, str) else spec
            if name == "default" and not values:
                # `-p default -p kmeans:bits=4`: the lossless clean-ups, then what the user adds.
                passes += [get_pass_class(plugins, n)() for n in DEFAULT_PIPELINE if n in plugins.passes]
                continue
            passes.append(instantiate(get_pass_class(plugins, name), values))
    return passes, not any(p.lossy for p in passes)


def optimize(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    passes: Sequence[PassSpec] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    budget: Budget | None = None,
    strict: bool = False,
    fixed_point: bool | None = None,
    seed: int = 0,
    input_shapes: dict[str, list[int]] | None = None,
    hardware: Any = None,
    verify: bool = True,
    plugins: Plugins | None = None,
) -> tuple[Model, PipelineReport]:
    """Run a pipeline (default: the lossless clean-ups) and return the optimized model and its report.

    A Model argument is edited in place; a path or ModelProto is loaded first (and never modified).
    ``fixed_point`` defaults to True for the default pipeline; an explicit pipeline runs once.
    """
    from nnopt.cost import analyze

    plugins = plugins or build_plugins()
    if not isinstance(model, Model):
        model = load_model(model)
    pass_list, lossless = build_passes(passes, plugins)
    proto = model.to_proto()
    verifier = (
        Verifier(proto, data_path=str(data) if data else None, seed=seed, input_shapes=input_shapes)
        if verify
        else None
    )
    rules = plugins.cost_rules

    def totals(p: onnx.ModelProto) -> dict[str, Any]:
        return analyze(p, hardware=hardware, input_shapes=input_shapes, rules=rules).totals

    manager = PassManager(
        pass_list,
        analyze=totals,
        verifier=verifier,
        budget=budget,
        strict=strict,
        fixed_point=(passes is None and lossless) if fixed_point is None else fixed_point,
        hook=plugins.pm.hook,
    )
    ctx = PassContext(
        seed=seed,
        samples=_pass_samples(proto, data, verifier),
        input_shapes=dict(input_shapes or {}),
    )
    report = manager.run(model, ctx)
    return model, report


def _pass_samples(proto: onnx.ModelProto, data: Any, verifier: Verifier | None) -> list[dict[str, Any]]:
    """The user's reference data for data-aware passes (never generated inputs: those verify rewrites but
    are no data to fit weights on), read once whether or not verification runs."""
    if not data:
        return []
    if verifier is not None and verifier.samples:
        return verifier.samples
    from nnopt.runtime import load_samples, make_session

    return load_samples(data, make_session(proto))
