"""Builds nnopt's pluggy PluginManager: hook specs, built-in passes, entry-point plugins, registries."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from nnopt import hookspecs
from nnopt.errors import PluginError, first_line
from nnopt.pipeline.base import Pass

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nnopt.plugins"
#: Set to 1/true/yes to run without third-party plugins (same as ``--no-plugins``).
NO_PLUGINS_ENV = "NNOPT_NO_PLUGINS"
BUILTIN = "nnopt (built-in)"


@dataclass
class PassEntry:
    cls: type[Pass]
    plugin: str


@dataclass
class PluginInfo:
    """One plugin as ``nnopt plugins`` lists it: where it comes from and what it registered."""

    name: str
    distribution: str
    status: str  # "loaded" or "failed"
    error: str = ""
    #: The distribution's version ("" when unknown, e.g. a plugin registered directly).
    version: str = ""
    #: What was accepted from it: pass names, cost rules' ops (``CostRule.label``), hardware profile names.
    passes: list[str] = field(default_factory=list)
    cost_rules: list[str] = field(default_factory=list)
    hardware: list[str] = field(default_factory=list)


@dataclass
class Plugins:
    """The loaded plugins and what they registered."""

    pm: pluggy.PluginManager
    passes: dict[str, PassEntry] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    #: The built-in cost rules plus every plugin's (a ``CostRuleRegistry``).
    cost_rules: Any = None
    #: Hardware profiles the plugins registered (``hardware_registry`` adds the built-in ones).
    hardware: dict[str, Any] = field(default_factory=dict)
    #: Metrics the plugins registered for the search (``--metric NAME``): name -> function(outputs, data).
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.status == "failed"]

    def hardware_registry(self) -> dict[str, Any]:
        """Every profile usable by name: the built-in ones, then the plugins' (which never replace them)."""
        from nnopt.cost.hardware import BUILTIN_PROFILES

        return {**self.hardware, **BUILTIN_PROFILES}


class _DefaultRunner:
    """The default ``nnopt_run_pass``: just run the pass. Registered last so wrappers see it."""

    @hookspecs.hookimpl(trylast=True)
    def nnopt_run_pass(self, pass_: Pass, model: Any, ctx: Any) -> Any:
        return pass_.run(model, ctx)


def plugins_disabled_by_env() -> bool:
    return os.environ.get(NO_PLUGINS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def build_plugins(*, load_entry_points: bool = True, extra: list[Any] | None = None) -> Plugins:
    """Create the plugin manager, register built-ins, then every ``nnopt.plugins`` entry point.

    A plugin that fails to import, implements a hook that does not exist, raises in a hook, or
    registers a duplicate pass name is reported in ``Plugins.plugins`` and skipped: it never takes nnopt
    down. ``extra`` registers plugin objects directly (tests, scripts).
    """
    pm = pluggy.PluginManager("nnopt")
    pm.add_hookspecs(hookspecs)
    from nnopt.cost.rules import default_registry

    plugins = Plugins(pm=pm, cost_rules=default_registry())
    pm.register(_DefaultRunner(), name="nnopt.default-runner")

    from nnopt import __version__
    from nnopt import passes as builtin_passes  # the `passes/` folder, installed as nnopt.passes
    from nnopt.cost.hardware import BUILTIN_PROFILES

    _register(plugins, builtin_passes, "nnopt.passes", BUILTIN, __version__)
    # nnopt's own cost rules and profiles are not registered through hooks; the built-in row lists them.
    plugins.plugins[-1].cost_rules = sorted({rule.label for rule in plugins.cost_rules.rules()})
    plugins.plugins[-1].hardware = sorted(BUILTIN_PROFILES)
    if load_entry_points and not plugins_disabled_by_env():
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = getattr(ep.dist, "version", "") or ""
            try:
                obj = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # boundary: third-party import; even its sys.exit() must not end nnopt
                reason = f"import failed: {_described(exc)}"
                plugins.plugins.append(PluginInfo(ep.name, dist, "failed", reason, version))
                log.warning("plugin %s (%s): %s", ep.name, dist, reason)
                continue
            _register(plugins, obj, ep.name, dist, version)
    for i, obj in enumerate(extra or []):
        _register(plugins, obj, getattr(obj, "__name__", f"extra-{i}"), "(registered directly)")
    return plugins


def _register(plugins: Plugins, obj: Any, name: str, dist: str, version: str = "") -> None:
    pm = plugins.pm
    info = PluginInfo(name, dist, "loaded", version=version)
    try:
        pm.register(obj, name=name)
        pm.check_pending()  # a misspelled hook (nnopt_register_pass) fails here, loudly
    except Exception as exc:  # boundary: pluggy validation of third-party code
        if pm.is_registered(obj):
            pm.unregister(obj)
        info.status, info.error = "failed", first_line(exc)
        plugins.plugins.append(info)
        log.warning("plugin %s (%s): %s", name, dist, exc)
        return
    problems: list[str] = []
    passes = _call(obj, "nnopt_register_passes", problems)
    rules = _call(obj, "nnopt_register_cost_rules", problems)
    hardware = _call(obj, "nnopt_register_hardware", problems)
    accepted = _register_metrics(plugins, _call(obj, "nnopt_register_metrics", problems), problems)
    for cls in passes:
        problem = _check_pass_class(cls)
        if problem is None and cls.name in plugins.passes:
            problem = f"pass name '{cls.name}' is already registered by {plugins.passes[cls.name].plugin}"
        if problem:
            problems.append(problem)
            continue
        plugins.passes[cls.name] = PassEntry(cls, dist)
        info.passes.append(cls.name)
        accepted += 1
    for rule in rules:
        try:
            plugins.cost_rules.register(rule)
            info.cost_rules.append(rule.label)
            accepted += 1
        except Exception as exc:  # boundary: a malformed or conflicting third-party rule
            problems.append(f"cost rule {getattr(rule, 'op_type', rule)!r}: {first_line(exc)}")
    for profile in hardware:
        if plugins.hardware.setdefault(profile.name, profile) is profile:
            info.hardware.append(profile.name)
    info.status = "failed" if problems and not (accepted or hardware) else "loaded"
    info.error = "; ".join(problems)
    for names in (info.passes, info.cost_rules, info.hardware):
        names.sort()
    if info.status == "failed":
        pm.unregister(obj)  # none of its hooks (wrappers, observers) may run
    plugins.plugins.append(info)
    if problems:
        log.warning("plugin %s (%s): %s", name, dist, "; ".join(problems))


def _register_metrics(plugins: Plugins, metrics: list[Any], problems: list[str]) -> int:
    """Add a plugin's metrics (the hook returns a dict, which ``_call`` turned into its items); count them."""
    from nnopt.search.metrics import BUILTIN_METRICS

    accepted = 0
    for item in metrics:
        name, function = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        if not isinstance(name, str) or not callable(function):
            problems.append(f"metric {name!r}: nnopt_register_metrics must return {{name: function}}")
        elif name in BUILTIN_METRICS or name in plugins.metrics or ":" in name:
            problems.append(f"metric {name!r}: the name is built in, taken, or has a ':'")
        else:
            plugins.metrics[name] = function
            accepted += 1
    return accepted


def _described(exc: BaseException) -> str:
    """An exception for a one-line plugin problem; SystemExit and other non-errors say what they are."""
    return first_line(exc) if isinstance(exc, Exception) else f"{type(exc).__name__}: {first_line(exc)}"


def _call(obj: Any, hook_name: str, problems: list[str]) -> list[Any]:
    """Call one plugin's own implementation of a registration hook, isolating its failures."""
    impl = getattr(obj, hook_name, None)
    if impl is None:
        return []
    try:
        result = impl()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # boundary: third-party hook (a sys.exit() in it included)
        problems.append(f"{hook_name} raised {type(exc).__name__}: {first_line(exc)}")
        return []
    return list(result.items()) if isinstance(result, dict) else list(result or [])


def _check_pass_class(cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        return f"{cls!r} is not a subclass of nnopt.Pass"
    if not cls.name or cls.name != cls.name.strip() or " " in cls.name or cls.name.lower() != cls.name:
        return f"pass class {cls.__name__} has no valid kebab-case name ('{cls.name}')"
    return None


def get_pass_class(plugins: Plugins, name: str) -> type[Pass]:
    import difflib

    from nnopt.errors import PassNotFoundError

    entry = plugins.passes.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(plugins.passes), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(sorted(plugins.passes))})"
        raise PassNotFoundError(f"unknown pass '{name}'{hint}")
    return entry.cls


__all__ = ["Plugins", "PluginInfo", "PassEntry", "PluginError", "build_plugins", "get_pass_class"]
