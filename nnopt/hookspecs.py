"""Every nnopt_* hook a plugin can implement. Hooks only ever gain parameters; none is ever renamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the specs only name these types: importing them at run time would be circular
    from nnopt.cost.hardware import HardwareProfile
    from nnopt.cost.rules import CostRule
    from nnopt.ir.model import Model
    from nnopt.pipeline.base import Pass, PassContext, PassResult
    from nnopt.pipeline.manager import PassRecord

hookspec = pluggy.HookspecMarker("nnopt")
hookimpl = pluggy.HookimplMarker("nnopt")


# The bodies are empty: pluggy calls the plugins' implementations, never these (pyproject.toml turns off
# mypy's empty-body check for this module).
@hookspec
def nnopt_register_passes() -> list[type[Pass[Any]]]:
    """Return the Pass classes this plugin provides.

    Built-in passes register through this same hook. Pass names must be unique across all plugins; a
    duplicate is refused and reported as a plugin error, the first registration wins (built-ins first).
    """


@hookspec
def nnopt_register_cost_rules() -> list[CostRule]:
    """Return cost rules: FLOPs/MACs for ops, e.g. ops of a custom domain."""


@hookspec
def nnopt_register_hardware() -> list[HardwareProfile]:
    """Return hardware profiles usable by name with ``--hardware``."""


@hookspec(firstresult=True)
def nnopt_run_pass(pass_: Pass[Any], model: Model, ctx: PassContext) -> PassResult | None:
    """Run one pass on the model. The default implementation calls ``pass_.run(model, ctx)``.

    Wrap it (``@hookimpl(wrapper=True)``) to time, profile or trace passes.
    """


@hookspec
def nnopt_after_pass(record: PassRecord, model: Model) -> None:
    """Observe each pass once the manager has verified it."""


@hookspec
def nnopt_register_metrics() -> dict[str, Any]:
    """Return metrics the search can score candidates with (``--metric NAME``): name -> function.

    A metric is ``function(outputs, data) -> float``, higher is better: ``outputs`` maps each model output
    name to its values stacked over the evaluation samples, ``data`` each input name to the stacked inputs
    (and the labels array, when the evaluation file has one). Built-in names (top1, agreement, cosine)
    cannot be replaced; a name another plugin registered first is refused.
    """
