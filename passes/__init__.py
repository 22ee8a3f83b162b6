"""nnopt's built-in passes, registered through the same pluggy hook as third-party plugins."""

from __future__ import annotations

from nnopt.hookspecs import hookimpl
from nnopt.pipeline.base import Pass


@hookimpl
def nnopt_register_passes() -> list[type[Pass]]:
    from nnopt.passes.constants_to_initializers import ConstantsToInitializers
    from nnopt.passes.conv_to_separable import ConvToSeparable
    from nnopt.passes.dce import DeadNodeElimination
    from nnopt.passes.distill import Distill
    from nnopt.passes.fix_input_shapes import FixInputShapes
    from nnopt.passes.fold_batchnorm import FoldBatchNorm
    from nnopt.passes.fold_constants import FoldConstants
    from nnopt.passes.fp16 import Fp16
    from nnopt.passes.fuse_hardswish import FuseHardSwish
    from nnopt.passes.hashed_sharing import HashedSharing
    from nnopt.passes.kmeans import KMeansWeightSharing
    from nnopt.passes.prune import Prune
    from nnopt.passes.quantize import Quantize
    from nnopt.passes.remove_noops import RemoveNoops
    from nnopt.passes.strip_debug_info import StripDebugInfo
    from nnopt.passes.svd import Svd

    return [
        DeadNodeElimination,
        ConstantsToInitializers,
        FoldConstants,
        RemoveNoops,
        FoldBatchNorm,
        FuseHardSwish,
        StripDebugInfo,
        FixInputShapes,
        ConvToSeparable,
        Svd,
        KMeansWeightSharing,
        HashedSharing,
        Prune,
        Distill,
        Quantize,
        Fp16,
    ]
