"""Every nnopt_* hook a plugin can implement. Hooks only ever gain parameters; none is ever renamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from nnopt.ir.model import Model
    from nnopt.pipeline.base import Pass, PassContext, PassResult

hookspec = pluggy.HookspecMarker("nnopt")
hookimpl = pluggy.HookimplMarker("nnopt")


@hookspec
def nnopt_register_passes() -> list[type[Pass]]:
    """Return the Pass classes this plugin provides.

    Built-in passes register through this same hook. Pass names must be unique across all plugins; a
    duplicate is refused and reported as a plugin error, the first registration wins (built-ins first).
    """


@hookspec
def nnopt_register_cost_rules() -> list[Any]:
    """Return ``nnopt.cost.rules.CostRule`` objects: FLOPs/MACs for ops, e.g. ops of a custom domain."""


@hookspec
def nnopt_register_hardware() -> list[Any]:
    """Return ``nnopt.cost.HardwareProfile`` objects usable by name with ``--hardware``."""


@hookspec(firstresult=True)
def nnopt_run_pass(pass_: Pass, model: Model, ctx: PassContext) -> PassResult | None:
    """Run one pass on the model. The default implementation calls ``pass_.run(model, ctx)``.

    Wrap it (``@hookimpl(wrapper=True)``) to time, profile or trace passes.
    """


@hookspec
def nnopt_after_pass(record: Any, model: Model) -> None:
    """Observe each pass once the manager has verified it (``record`` is a ``PassRecord``)."""
