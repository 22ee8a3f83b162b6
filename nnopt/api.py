"""The Python API behind the CLI: build a pipeline, run it on a model, get the model and its report.

    import nnopt

    pipeline = nnopt.Pipeline(["default", ("prune", {"ratio": 0.3}), "quantize"],
                              data="calib.npz", budget=nnopt.Budget(min_top1=0.98))
    model, report = pipeline.run("model.onnx")
    nnopt.save_model(model, "model.opt.onnx")

or, from a pipeline file (TOML or JSON, see ``nnopt.pipeline.config``)::

    model, report = nnopt.Pipeline.from_file("pipeline.toml").run("model.onnx")

``nnopt.optimize(model, passes, **settings)`` is the one-call form of the same thing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from nnopt.analysis.manager import AnalysisManager, AnalysisSettings
from nnopt.cost.hardware import HardwareProfile
from nnopt.errors import DataError, OptionError
from nnopt.ir.model import Model, load_model
from nnopt.pipeline.base import Pass, PassContext
from nnopt.pipeline.manager import Budget, PassManager, PipelineReport
from nnopt.pipeline.progress import Progress
from nnopt.pipeline.spec import DEFAULT_PIPELINE, instantiate, parse_pass_spec
from nnopt.pipeline.verify import Verifier
from nnopt.plugin_manager import Plugins, build_plugins, get_pass_class
from nnopt.runtime import DEFAULT_RUN_TIME_LIMIT_S, DataSource, run_time_limit

#: A pass in a pipeline: ``"name"`` or ``"name:key=value,..."`` (as on the command line), a
#: ``(name, {option: value})`` pair with typed values, or a configured ``Pass`` instance.
#: ``"default"`` stands for the lossless default pipeline.
#: Generated inputs verify a lossless pipeline: two samples show whether outputs moved at all.
GENERATED_SAMPLES = 2
#: A budget judged on generated inputs gets more of them, so one lucky sample cannot pass it.
GENERATED_BUDGET_SAMPLES = 16

PassSpec = str | Pass | tuple[str, dict[str, Any]]
ModelSource = Model | onnx.ModelProto | str | os.PathLike[str]


@dataclass
class Pipeline:
    """An ordered list of passes plus the settings they run under.

    Attributes:
        passes: the passes in order; None is the default (lossless) pipeline.
        data: reference inputs for verification, calibration and data-aware fitting: an ``.npz`` path, or
            the same in memory: a dict of arrays (input name → samples on the first axis, and optionally
            ``labels``), one array (a model with one input), or an iterable of feeds, one dict of input
            name → array per sample (read once, here). See ``nnopt.runtime.DataSource``.
        budget: how far lossy passes may move the outputs from the original model's.
        strict: a pass that is rolled back raises ``PassFailedError`` instead of being skipped.
        seed: seeds generated inputs and every randomised pass (same seed → byte-identical output).
        input_shapes: concrete shapes for dynamic inputs, e.g. ``{"x": [1, 3, 224, 224]}``.
        hardware: profile for the cost estimates: a ``HardwareProfile``, a profile name, or
            ``"flops=...,bandwidth=..."``; None is the default profile.
        verify: check every pass's outputs in onnxruntime (False: the checker and shape inference only).
        fixed_point: repeat the pipeline until nothing changes; None repeats the default pipeline only.
        run_time_limit: seconds one onnxruntime run of verification may take before it is stopped and
            verification is reported impossible (a valid Loop may never end); None: no limit.
    """

    passes: Sequence[PassSpec] | None = None
    data: DataSource | None = None
    budget: Budget = field(default_factory=Budget)
    strict: bool = False
    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    hardware: HardwareProfile | str | None = None
    verify: bool = True
    fixed_point: bool | None = None
    run_time_limit: float | None = DEFAULT_RUN_TIME_LIMIT_S

    def __post_init__(self) -> None:
        if isinstance(self.data, Iterable) and not isinstance(self.data, str | os.PathLike | np.ndarray | Mapping):
            # An iterable of feeds (a generator, a DataLoader-like object) is read once, so that every run
            # of this pipeline, and every copy of it, sees the same samples.
            object.__setattr__(self, "data", tuple(self.data))
        # The command line and pipeline files check these too; this is the Python API's check.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise OptionError(f"seed: expected a non-negative integer, got {self.seed!r}")
        limit = self.run_time_limit
        if limit is not None and not (isinstance(limit, int | float) and 0 < limit < math.inf):
            raise OptionError(f"run_time_limit: expected a positive number of seconds or None, got {limit!r}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], plugins: Plugins | None = None, **overrides: Any) -> Pipeline:
        """Read and validate a pipeline file; keyword arguments override what the file sets.

        The file's pass options are built and its hardware profile read here, once: running the result
        parses neither again.
        """
        from nnopt.pipeline.config import load_pipeline_file

        plugins = plugins or build_plugins()
        pipeline = load_pipeline_file(Path(path), _pass_classes(plugins), plugins.hardware_registry())
        return pipeline.replace(**overrides) if overrides else pipeline

    def replace(self, **changes: Any) -> Pipeline:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)

    def build(self, plugins: Plugins | None = None) -> list[Pass]:
        """The configured pass instances (validates every name and option without touching a model)."""
        return [p for p in self.resolved(plugins).passes or [] if isinstance(p, Pass)]

    def resolved(self, plugins: Plugins | None = None) -> Pipeline:
        """This pipeline with everything validated and built once: each pass spec an instance with its
        options, ``hardware`` a ``HardwareProfile``, ``fixed_point`` decided. Running a resolved pipeline
        parses nothing again; resolving one twice returns it unchanged."""
        if self._is_resolved():
            return self
        plugins = plugins or build_plugins()
        pass_list, lossless = build_passes(self.passes, plugins)
        fixed_point = self.passes is None and lossless if self.fixed_point is None else self.fixed_point
        return self.replace(passes=pass_list, hardware=self._hardware(plugins), fixed_point=fixed_point)

    def _is_resolved(self) -> bool:
        return (
            self.passes is not None
            and all(isinstance(p, Pass) for p in self.passes)
            and isinstance(self.hardware, HardwareProfile)
            and self.fixed_point is not None
        )

    def run(
        self,
        model: ModelSource,
        *,
        plugins: Plugins | None = None,
        progress: Progress | None = None,
    ) -> tuple[Model, PipelineReport]:
        """Run the pipeline and return the optimized model and its report.

        A ``Model`` argument is edited in place; a path or ModelProto is loaded first and never modified.
        ``progress`` (e.g. ``nnopt.StreamProgress()``) is told about each pass and each slow layer.
        """
        plugins = plugins or build_plugins()
        pipeline = self.resolved(plugins)
        with run_time_limit(pipeline.run_time_limit):
            return pipeline._run(model, plugins, progress)

    def _run(
        self, model: ModelSource, plugins: Plugins, progress: Progress | None
    ) -> tuple[Model, PipelineReport]:
        """``run`` on a resolved pipeline, under its run time limit."""
        if self.budget.is_set and not self.verify:
            raise OptionError("a budget needs numerical verification: drop --no-verify (verify = false) or the budget")
        if self.budget.min_top1 is not None and self.data is None:
            raise DataError(
                "a top-1 budget (--min-top1) needs reference data (--data): agreement on generated noise "
                "says nothing about accuracy"
            )
        if not isinstance(model, Model):
            model = load_model(model)
        settings = AnalysisSettings(
            input_shapes=dict(self.input_shapes), hardware=cast(HardwareProfile, self.hardware),
            rules=plugins.cost_rules,
        )
        analyses = AnalysisManager(model, settings)
        proto = analyses.proto()  # the one export of the input: verifier, samples and the first pass share it
        data = self.data
        verifier = (
            Verifier(proto, data=data, seed=self.seed, input_shapes=self.input_shapes,
                     samples=GENERATED_BUDGET_SAMPLES if self.budget.is_set else GENERATED_SAMPLES,
                     shapes=analyses.shapes())  # its runs take the limit run() set
            if self.verify
            else None
        )
        if verifier is not None and verifier.timed_out:
            # The model does not end on these inputs: the cost model must not wait for it on every version.
            settings = dataclasses.replace(settings, probe_shapes=False)
            analyses.settings = settings
        samples = _pass_samples(proto, data, verifier)
        settings = _with_data_shapes(analyses, settings, proto, samples)
        manager = PassManager(
            self.build(plugins),  # already built by resolved(): this only reads the list
            settings=settings,
            verifier=verifier,
            budget=self.budget,
            strict=self.strict,
            fixed_point=bool(self.fixed_point),
            hook=plugins.pm.hook,
            progress=progress,
        )
        ctx = PassContext(
            seed=self.seed,
            samples=samples,
            input_shapes=dict(self.input_shapes),
            analyses=analyses,
            reference_model=proto,
            labels=_pass_labels(proto, data, len(samples)),
        )
        report = manager.run(model, ctx)
        if settings.input_shapes != self.input_shapes:
            from nnopt.cost.inputs import data_shapes_note

            note = data_shapes_note(proto.graph, settings.input_shapes, self.input_shapes)
            report.notes.extend([note] if note else [])
        return model, report

    def _hardware(self, plugins: Plugins) -> HardwareProfile:
        from nnopt.cost.hardware import DEFAULT_PROFILE, parse_hardware

        if isinstance(self.hardware, HardwareProfile):
            return self.hardware
        if self.hardware is None:
            return DEFAULT_PROFILE
        return parse_hardware(self.hardware, plugins.hardware_registry())


def optimize(
    model: ModelSource,
    passes: Sequence[PassSpec] | None = None,
    *,
    data: DataSource | None = None,
    budget: Budget | None = None,
    strict: bool = False,
    fixed_point: bool | None = None,
    seed: int = 0,
    input_shapes: dict[str, list[int]] | None = None,
    hardware: HardwareProfile | str | None = None,
    verify: bool = True,
    run_time_limit: float | None = DEFAULT_RUN_TIME_LIMIT_S,
    plugins: Plugins | None = None,
    progress: Progress | None = None,
) -> tuple[Model, PipelineReport]:
    """Run a pipeline (default: the lossless clean-ups) and return the optimized model and its report.

    The one-call form of ``Pipeline(passes, ...).run(model)``; see ``Pipeline`` for the settings.
    """
    pipeline = Pipeline(
        passes,
        data=data,
        budget=budget or Budget(),
        strict=strict,
        seed=seed,
        input_shapes=dict(input_shapes or {}),
        hardware=hardware,
        verify=verify,
        fixed_point=fixed_point,
        run_time_limit=run_time_limit,
    )
    return pipeline.run(model, plugins=plugins, progress=progress)


def build_passes(specs: Sequence[PassSpec] | None, plugins: Plugins) -> tuple[list[Pass], bool]:
    """Resolve specs into pass instances; None means the default pipeline. Also says if it is lossless."""
    if specs is None:
        specs = ["default"]
    passes: list[Pass] = []
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


def _pass_classes(plugins: Plugins) -> dict[str, type[Pass]]:
    return {name: entry.cls for name, entry in plugins.passes.items()}


def _with_data_shapes(
    analyses: AnalysisManager, settings: AnalysisSettings, proto: onnx.ModelProto, samples: list[dict[str, Any]]
) -> AnalysisSettings:
    """The settings with the dynamic input dims the data fixes (its first sample; given shapes win): the
    cost report then costs the shapes the model runs at, not dims of 1. Unchanged without data."""
    from nnopt.cost.inputs import sample_input_shapes

    if not samples:
        return settings
    shapes = sample_input_shapes(proto.graph, samples[0], settings.input_shapes)
    if shapes == settings.input_shapes:
        return settings
    settings = dataclasses.replace(settings, input_shapes=shapes)
    analyses.settings = settings
    return settings


def _pass_samples(proto: onnx.ModelProto, data: DataSource | None, verifier: Verifier | None) -> list[dict[str, Any]]:
    """The user's reference data for data-aware passes (never generated inputs: those verify rewrites but
    are no data to fit weights on), read once whether or not verification runs."""
    if data is None:
        return []
    if verifier is not None and verifier.samples:
        return verifier.samples
    from nnopt.runtime import load_samples, make_session

    return load_samples(data, make_session(proto))


def _pass_labels(proto: onnx.ModelProto, data: DataSource | None, count: int) -> np.ndarray | None:
    """The data's class labels, one per pass sample, or None (no data, or no ``labels`` array)."""
    if data is None or not count:
        return None
    from nnopt.runtime import load_labels, make_session

    return load_labels(data, make_session(proto), count)
