"""Pipeline files: a whole ``nnopt optimize`` run (passes, options, verification) in one TOML or JSON file.

The format is chosen by the extension, ``.toml`` (read with the standard library's ``tomllib``) or ``.json``;
both hold the same structure. YAML is not supported (it would need a dependency). In TOML::

    seed = 0                            # all top-level settings are optional
    hardware = "x86-avx2-2core"         # a profile name, "flops=...,bandwidth=...", or a profile .json
                                        # (relative to the pipeline file's folder)
    fixed_point = "auto"                # "auto" | true | false
    input_shapes = { x = [1, 3, 224, 224] }

    [verify]
    enabled = true                      # false: like --no-verify
    data = "calib.npz"                  # relative to the pipeline file's folder; must exist
    strict = false
    max_rel_error = 0.05                # the lossy budget; each key optional
    min_cosine = 0.99
    min_top1 = 0.98

    [[passes]]                          # no [[passes]] at all: the default pipeline
    name = "default"                    # the lossless default pipeline (takes no options)

    [[passes]]
    name = "prune"
    ratio = 0.3                         # every other key is an option of that pass
    round_to = 8

Everything is validated before anything runs: names, option types and ranges (the pass's own checks),
the hardware profile, that the data file exists. Validation goes on past a problem, and one
``PipelineFileError`` reports them all, a line each naming the file, the key path and what to do, e.g.
``pipeline.toml: passes[2].ratio: expected a number, got the string 'abc'``. A string converts as on the
command line for every key, settings and pass options alike (``seed = "7"``, ``ratio = "0.3"``).
docs/pipeline-files.md documents every key (a test checks that it lists each one accepted here).

Key paths count from 1: ``passes[2]`` is the second ``[[passes]]`` table in the file (the second object of
the ``"passes"`` array in JSON), and ``passes[2].nodes[1]`` the first item of its ``nodes`` list.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from nnopt.cost.hardware import PROFILE_SUFFIX, HardwareProfile, parse_hardware
from nnopt.errors import InputError, OptionError
from nnopt.pipeline.base import Pass, _described, _typed_value
from nnopt.pipeline.manager import Budget

if TYPE_CHECKING:
    from nnopt.api import Pipeline

#: The name that stands for the lossless default pipeline in ``[[passes]]``.
DEFAULT_PASS_NAME = "default"

TOP_LEVEL_KEYS = ("seed", "hardware", "fixed_point", "input_shapes", "verify", "passes")
VERIFY_KEYS = ("enabled", "data", "strict", "max_rel_error", "min_cosine", "min_top1")


class PipelineFileError(InputError):
    """A pipeline file is missing, unreadable, malformed, or names an unknown pass, option or value.

    Validation goes on past the first problem: ``problems`` (``PipelineFileError.several``) holds every one
    found, a line each (``p.toml: passes[2].ratio: ...``), and the CLI prints each as an ``nnopt: error:``
    line.
    """


class _Problems:
    """Collects a file's problems so that validation goes on past the first; ``raise_any`` reports them."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        """One problem at key path ``where`` ("" for the file as a whole)."""
        self.lines.append(f"{self.label}: {where}: {message}" if where else f"{self.label}: {message}")

    def add_error(self, error: InputError) -> None:
        """The problems of an error raised by code that names the file and key itself."""
        self.lines.extend(error.lines())

    def raise_any(self) -> None:
        if self.lines:
            raise PipelineFileError.several(self.lines)


def load_pipeline_file(
    path: str | Path,
    passes: Mapping[str, type[Pass]],
    hardware: Mapping[str, HardwareProfile],
) -> Pipeline:
    """Read and validate a ``.toml`` or ``.json`` pipeline file into a ``Pipeline``.

    Settings the file leaves out keep ``Pipeline``'s defaults; the caller applies its own overrides
    (command-line flags) with ``Pipeline.replace``.

    Args:
        path: the file.
        passes: the pass registry, name → Pass class (e.g. from ``build_plugins()``).
        hardware: the hardware profiles usable by name (``Plugins.hardware_registry()``).

    Raises:
        PipelineFileError: the file is missing or unreadable, has an unsupported extension, a syntax
            error, or anything ``parse_pipeline`` rejects.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        if path.suffix.lower() in (".yml", ".yaml"):
            raise PipelineFileError(f"{path}: YAML pipeline files are not supported; write it as .toml or .json")
        raise PipelineFileError(
            f"{path}: unsupported pipeline file extension '{path.suffix}'; use {' or '.join(_READERS)}"
        )
    if not path.exists():
        raise PipelineFileError(f"{path}: file not found")
    if not path.is_file():
        raise PipelineFileError(f"{path}: not a file; --pipeline takes a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PipelineFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return parse_pipeline(reader(text, str(path)), passes, hardware, source=path)


def parse_pipeline(
    mapping: dict[str, Any],
    passes: Mapping[str, type[Pass]],
    hardware: Mapping[str, HardwareProfile],
    source: Path | None = None,
) -> Pipeline:
    """Validate a pipeline given as a mapping (a parsed file); ``source`` names it in messages and is the
    folder relative data paths are resolved against (the working directory when None).

    Each pass is built once here, from its typed options (``[[passes]]`` entries become ``Pass``
    instances; ``default`` stays the name of the default pipeline), and the hardware profile is read once.
    """
    from nnopt.api import Pipeline

    label = str(source) if source is not None else "pipeline"
    if not isinstance(mapping, dict):
        raise PipelineFileError(f"{label}: expected a table of settings at the top level, got {_described(mapping)}")
    problems = _Problems(label)
    _check_keys(mapping, TOP_LEVEL_KEYS, problems, "")
    verify = _table(mapping.get("verify", {}), problems, "verify")
    _check_keys(verify, VERIFY_KEYS, problems, "verify.")

    def get(table: dict[str, Any], key: str, check: Callable[[Any], Any], prefix: str = "") -> Any:
        return _setting(table, key, check, problems, prefix)

    # Checked in the order the keys are documented (TOP_LEVEL_KEYS, VERIFY_KEYS), so problems are listed so.
    seed = get(mapping, "seed", _seed)
    hardware_spec = get(mapping, "hardware", _string)
    profile = None
    if hardware_spec is not None:
        try:
            profile = parse_hardware(_profile_file_path(hardware_spec, source), dict(hardware))
        except InputError as exc:
            problems.add("hardware", str(exc))
    fixed_point_text = get(mapping, "fixed_point", _fixed_point)
    input_shapes = _input_shapes(mapping.get("input_shapes", {}), problems)
    enabled = get(verify, "enabled", _boolean, "verify.")
    data_text = get(verify, "data", _string, "verify.")
    data = _data_path(data_text, source, problems) if data_text is not None else None
    strict = get(verify, "strict", _boolean, "verify.")
    limits = {key: get(verify, key, _budget_limit(key), "verify.") for key in Budget.RANGES}
    if enabled is False and any(value is not None for value in limits.values()):
        # Without verification nothing measures the outputs, so the budget would be silently ignored.
        first = next(key for key, value in limits.items() if value is not None)
        problems.add(f"verify.{first}", "a budget needs verification; remove it or set verify.enabled = true")
    settings: dict[str, Any] = {
        "seed": seed,
        "hardware": profile,
        "fixed_point": None if fixed_point_text in (None, "auto") else fixed_point_text,
        "input_shapes": input_shapes,
        "verify": enabled,
        "data": data,
        "strict": strict,
        "budget": Budget(**limits),
        "passes": _passes(mapping.get("passes"), passes, problems),
    }
    problems.raise_any()
    # What the file leaves out keeps the Pipeline's default (None is "not set" for these three only).
    unset_means_default = ("strict", "verify", "seed")
    return Pipeline(**{k: v for k, v in settings.items() if v is not None or k not in unset_means_default})


# ---------------------------------------------------------------------------------------------- readers
def _read_toml(text: str, label: str) -> Any:
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise PipelineFileError(f"{label}: nested too deeply to read (TOML syntax)") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib (3.11) puts the position at the end of its message: "Invalid value (at line 4, column 9)".
        message = str(exc)
        found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, flags=re.DOTALL)
        if found:
            message = f"line {found[2]}, column {found[3]}: {found[1]}"
        raise PipelineFileError(f"{label}: {message} (TOML syntax)") from None


def _read_json(text: str, label: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _json_object(pairs, label))
    except RecursionError:
        raise PipelineFileError(f"{label}: nested too deeply to read (JSON syntax)") from None
    except json.JSONDecodeError as exc:
        raise PipelineFileError(f"{label}: line {exc.lineno}, column {exc.colno}: {exc.msg} (JSON syntax)") from None


def _json_object(pairs: list[tuple[str, Any]], label: str) -> dict[str, Any]:
    """A JSON object; a repeated key is an error (TOML rejects it too; json would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PipelineFileError(f"{label}: key '{key}' appears twice in one object; keep one")
        out[key] = value
    return out


#: Extension → reader(text, label) returning the parsed mapping.
_READERS: dict[str, Callable[[str, str], Any]] = {".toml": _read_toml, ".json": _read_json}


# ---------------------------------------------------------------------------------------------- sections
def _passes(entries: Any, registry: Mapping[str, type[Pass]], problems: _Problems) -> list[Pass | str] | None:
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        got = "an empty list" if entries == [] else _described(entries)
        problems.add("passes", f"expected a list of pass tables ([[passes]] with a name), got {got}; "
                               "leave 'passes' out for the default pipeline")
        return None
    out: list[Pass | str] = []
    for index, entry in enumerate(entries, 1):
        built = _pass_entry(entry, f"passes[{index}]", registry, problems)
        out += [built] if built is not None else []
    return out


def _pass_entry(entry: Any, where: str, registry: Mapping[str, type[Pass]], problems: _Problems) -> Pass | str | None:
    """One ``[[passes]]`` table as a configured pass (or the name of the default pipeline); None after
    adding its problem."""
    if not isinstance(entry, dict):
        problems.add(where, f'expected a table with a name (name = "prune"), got {_described(entry)}')
        return None
    options = {key: value for key, value in entry.items() if key != "name"}
    name = entry.get("name")
    if name is None:
        problems.add(where, 'missing name; add name = "<pass>" (see nnopt passes)')
        return None
    if not isinstance(name, str):
        problems.add(f"{where}.name", f"expected a pass name string, got {_described(name)}")
        return None
    if name == DEFAULT_PASS_NAME:
        if options:
            problems.add(where, f"the default pipeline takes no options (got '{next(iter(options))}'); "
                                "list its passes one by one to configure them")
            return None
        return DEFAULT_PASS_NAME
    cls = registry.get(name)
    if cls is None:
        problems.add(f"{where}.name", f"unknown pass '{name}' ({_suggest(name, registry)})")
        return None
    try:
        return cls(cls.Options.from_values(options, name, where=f"{problems.label}: {where}"))
    except OptionError as exc:
        problems.add_error(exc)
        return None


def _input_shapes(value: Any, problems: _Problems) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for name, dims in _table(value, problems, "input_shapes").items():
        dims = _typed(dims, tuple[int, ...])
        if (
            not isinstance(dims, list | tuple)
            or not dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
        ):
            problems.add(f"input_shapes.{name}",
                         f"expected a list of positive integers such as [1, 3, 224, 224], got {_described(dims)}")
            continue
        shapes[name] = list(dims)
    return shapes


def _profile_file_path(spec: str, source: Path | None) -> str:
    """A relative profile file (``hardware = "board.json"``) is read from the pipeline file's folder, like
    ``verify.data``, so a pipeline and its calibrated profile can be kept together and run from anywhere.
    Profile names and ``flops=...`` specs are returned unchanged."""
    text = spec.strip()
    if source is None or not text.lower().endswith(PROFILE_SUFFIX) or Path(text).is_absolute():
        return spec
    return str(source.parent / text)


def _data_path(text: str, source: Path | None, problems: _Problems) -> Path | None:
    path = Path(text)
    if source is not None and not path.is_absolute():
        path = source.parent / path
    if not path.is_file():
        problems.add("verify.data", f"file not found: {path} (relative paths are read from the pipeline file's folder)")
        return None
    return path


# ---------------------------------------------------------------------------------------------- values
def _setting(table: dict[str, Any], key: str, check: Callable[[Any], Any], problems: _Problems, prefix: str = "") -> Any:
    """One optional key through its checker (None when absent or wrong: the checker's ValueError is added
    to ``problems``, naming the key path)."""
    if key not in table:
        return None
    try:
        return check(table[key])
    except ValueError as exc:
        problems.add(f"{prefix}{key}", str(exc))
        return None


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` the way pass options take it (``PassOptions.from_values``): a string
    converted as the command line converts it (``"7"``, ``"0.5"``, ``"true"``, ``"1,3,224,224"``), a list
    item by item; so every setting of a pipeline file takes strings as pass options do. A value that does
    not convert, or is not a string or a list, comes back unchanged, for its checker to judge."""
    if not isinstance(value, str | list):
        return value
    try:
        return _typed_value(value, hint, "")
    except OptionError:
        return value


def _boolean(value: Any) -> bool:
    value = _typed(value, bool)
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_described(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_described(value)}")
    return value


def _seed(value: Any) -> int:
    value = _typed(value, int)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {_described(value)}")
    return value


def _fixed_point(value: Any) -> bool | str:
    value = value if value == "auto" else _typed(value, bool)
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f'expected "auto", true or false, got {_described(value)}')


def _budget_limit(key: str) -> Callable[[Any], float]:
    """A checker for one budget limit: ``Budget``'s own range check, with this file's wording of types."""

    def check(value: Any) -> float:
        value = _typed(value, float)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected {Budget.wanted(key)}, got {_described(value)}")
        return Budget.checked(key, value)

    return check


def _table(value: Any, problems: _Problems, key: str) -> dict[str, Any]:
    """``value`` if it is a table, else an empty one after adding the problem."""
    if isinstance(value, dict):
        return value
    problems.add(key, f"expected a table ([{key}] or {key} = {{...}}), got {_described(value)}")
    return {}


def _check_keys(table: dict[str, Any], valid: tuple[str, ...], problems: _Problems, prefix: str) -> None:
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'?; " if close else ""
            problems.add(f"{prefix}{key}", f"unknown key ({hint}valid keys: {', '.join(valid)})")


def _suggest(name: str, registry: Mapping[str, type[Pass]]) -> str:
    # Same matching as plugin_manager.get_pass_class, so the CLI's -p and pipeline files suggest alike.
    close = difflib.get_close_matches(name, [DEFAULT_PASS_NAME, *registry], n=1)
    if close:
        return f"did you mean '{close[0]}'?; see nnopt passes"
    return f"known: {', '.join(sorted([DEFAULT_PASS_NAME, *registry]))}; see nnopt passes"


__all__ = ["PipelineFileError", "load_pipeline_file", "parse_pipeline"]
