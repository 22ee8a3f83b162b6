"""nnopt: a plugin-based, compiler-style optimizer for ONNX neural networks.

The public surface for pipeline scripts and plugin authors is what this module exports.
"""

from __future__ import annotations

from nnopt.errors import (
    DataError,
    InputError,
    ModelLoadError,
    NnoptError,
    OptionError,
    PassFailedError,
    PassNotFoundError,
    PluginError,
    UnsafeExternalDataError,
)
from nnopt.hookspecs import hookimpl
from nnopt.ir.model import Model, load_model, save_model
from nnopt.pipeline.base import NoOptions, Pass, PassContext, PassOptions, PassResult
from nnopt.pipeline.manager import Budget, PassManager, PassRecord, PipelineReport

__version__ = "0.1.0"


def optimize(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See ``nnopt.api.optimize``."""
    from nnopt.api import optimize as _optimize

    return _optimize(*args, **kwargs)


def analyze(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See ``nnopt.cost.analyze``."""
    from nnopt.cost import analyze as _analyze

    return _analyze(*args, **kwargs)


__all__ = [
    "Budget",
    "DataError",
    "InputError",
    "Model",
    "ModelLoadError",
    "NnoptError",
    "NoOptions",
    "OptionError",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "PassNotFoundError",
    "PassOptions",
    "PassRecord",
    "PassResult",
    "PipelineReport",
    "PluginError",
    "UnsafeExternalDataError",
    "analyze",
    "hookimpl",
    "load_model",
    "optimize",
    "save_model",
]
