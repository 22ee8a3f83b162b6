"""nnopt: a plugin-based, compiler-style optimizer for ONNX neural networks.

The public surface for pipeline scripts and plugin authors is what this module exports.
"""

from __future__ import annotations

from nnopt.analysis.manager import Analysis, AnalysisManager, AnalysisSettings
from nnopt.analysis.selection import NodeSelection
from nnopt.cost.hardware import HardwareProfile
from nnopt.cost.rules import Cost, CostContext, CostRule
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
from nnopt.ir.constants import constant_values
from nnopt.ir.graphview import consumers, dataflow, producer, topological_nodes
from nnopt.ir.model import Model, load_model, replace_tensor, save_model
from nnopt.ir.naming import taken_names, unique_name
from nnopt.ir.walk import all_graphs, graph_outputs, is_onnx_op, remove_dead_nodes
from nnopt.pipeline.base import (
    LAYER_ACTIONS,
    Figure,
    LayerAction,
    LayerDecision,
    NoOptions,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    PassStatus,
)
from nnopt.pipeline.manager import Budget, PassManager, PassRecord, PipelineReport
from nnopt.pipeline.progress import Progress, StreamProgress

__version__ = "0.1.0"


# After the names above: the API modules import the plugin manager and the analysis, which import from
# ``nnopt`` (the built-in passes are imported only when ``build_plugins`` runs). Imported, not wrapped, so
# that ``inspect.signature``, help() and type checkers see the real parameters.
from nnopt.api import Pipeline, optimize  # noqa: E402
from nnopt.cost.analysis import analyze_with_plugins as analyze  # noqa: E402
from nnopt.plugin_manager import build_plugins  # noqa: E402
from nnopt.search.driver import compress  # noqa: E402

__all__ = [
    "Analysis",
    "AnalysisManager",
    "AnalysisSettings",
    "Budget",
    "Cost",
    "CostContext",
    "CostRule",
    "HardwareProfile",
    "all_graphs",
    "constant_values",
    "consumers",
    "dataflow",
    "graph_outputs",
    "is_onnx_op",
    "producer",
    "remove_dead_nodes",
    "replace_tensor",
    "taken_names",
    "topological_nodes",
    "unique_name",
    "DataError",
    "InputError",
    "LAYER_ACTIONS",
    "Figure",
    "LayerAction",
    "LayerDecision",
    "Model",
    "ModelLoadError",
    "NnoptError",
    "NodeSelection",
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
    "PassStatus",
    "Pipeline",
    "PipelineReport",
    "Progress",
    "StreamProgress",
    "PluginError",
    "UnsafeExternalDataError",
    "analyze",
    "build_plugins",
    "compress",
    "hookimpl",
    "load_model",
    "optimize",
    "save_model",
]
