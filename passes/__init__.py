"""nnopt's built-in passes, registered through the same pluggy hook as third-party plugins."""

from __future__ import annotations

from nnopt.hookspecs import hookimpl
from nnopt.pipeline.base import Pass


@hookimpl
def nnopt_register_passes() -> list[type[Pass]]:
    from nnopt.passes.constants_to_initializers import ConstantsToInitializers
    from nnopt.passes.dce import DeadNodeElimination
    from nnopt.passes.fold_batchnorm import FoldBatchNorm
    from nnopt.passes.fold_constants import FoldConstants
    from nnopt.passes.remove_noops import RemoveNoops

    return [DeadNodeElimination, ConstantsToInitializers, FoldConstants, RemoveNoops, FoldBatchNorm]
