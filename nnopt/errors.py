"""The NnoptError hierarchy: every error nnopt raises on purpose, each with a CLI exit code."""

from __future__ import annotations


class NnoptError(Exception):
    """Base class of nnopt's own errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(NnoptError):
    """Bad input from the user: a missing or corrupt model, an unknown pass or option, bad data."""

    exit_code = 2


class ModelLoadError(InputError):
    """The model file does not exist, is not ONNX, is truncated, or is rejected by the checker."""


class UnsafeExternalDataError(ModelLoadError):
    """An external-data location points outside the model's folder."""


class PassNotFoundError(InputError):
    """A pipeline names a pass that no loaded plugin registers."""


class OptionError(InputError):
    """A pass option is unknown or its value is invalid."""


class DataError(InputError):
    """A reference-data file does not match the model's inputs."""


class PassFailedError(NnoptError):
    """A pass was rolled back and ``--strict`` asked for that to be an error."""

    exit_code = 3


class PluginError(NnoptError):
    """A plugin could not be loaded or registered."""


def first_line(exc: BaseException, width: int = 300) -> str:
    """An exception's first line, at most ``width`` characters (its type name when it has no message):
    what a one-line error, a rollback reason or a per-layer report shows."""
    text = str(exc).strip()
    return text.splitlines()[0][:width] if text else type(exc).__name__
