"""Test setup: quiet third-party logging; make tests/ helpers (realmodels) importable."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx_graphsurgeon as gs
import onnxruntime

sys.path.insert(0, str(Path(__file__).parent))
onnxruntime.set_default_logger_severity(3)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
