"""The NnoptError hierarchy (every error nnopt raises on purpose, each with a CLI exit code), and first_line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from nnopt.pipeline.manager import PipelineReport


class NnoptError(Exception):
    """Base class of nnopt's own errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    #: Set by ``several``: each problem of an error that reports more than one, a line each.
    problems: tuple[str, ...] = ()

    @classmethod
    def several(cls, problems: Sequence[str]) -> Self:
        """One error reporting every problem found (a pipeline file's, a pass's options), not the first only."""
        error = cls("\n".join(problems))
        error.problems = tuple(problems)
        return error

    def lines(self) -> list[str]:
        """What the CLI prints, one ``nnopt: error:`` line each: every problem of an error made by
        ``several``, else the message's first line."""
        return list(self.problems) or [first_line(self)]


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


class OutputError(InputError):
    """An output cannot be written where asked: an unwritable or full disk, a special file, one of the input's files.

    The environment's fault, not nnopt's: the CLI exits 2 with the operating system's message.
    """


class PassFailedError(NnoptError):
    """A pass was rolled back and ``--strict`` asked for that to be an error.

    ``report``: the pipeline's report up to and including the failed pass (a ``PipelineReport``; None when
    raised outside a pipeline run), so that the command line can still write it.
    """

    exit_code = 3
    report: PipelineReport | None = None


class PluginError(NnoptError):
    """A plugin could not be loaded or registered."""


def first_line(exc: BaseException, width: int | None = None, mark: str = "") -> str:
    """An exception's message cut to its first line, for one-line reports; the type's name if it has none.

    Args:
        exc: the exception.
        width: at most this many characters (None: the whole line).
        mark: what ends a line that was cut (e.g. ``"..."``), counted within ``width``.
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if width is None or len(line) <= width:
        return line
    return line[: width - len(mark)] + mark
