"""Pass, PassOptions, LayerDecision, PassResult and PassContext: the contract between the manager and every pass."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeAlias, TypeVar, Union, cast

import numpy as np

from nnopt.errors import OptionError
from nnopt.ir.model import Model

if TYPE_CHECKING:
    import onnx

    from nnopt.analysis.manager import AnalysisManager


@dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options: a frozen dataclass whose fields are the options.

    Each field has a type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``tuple[str, ...]``, or
    ``X | None``), a default, and ``metadata={"help": "..."}``. Subclasses validate in ``__post_init__``
    by raising ``OptionError``. The same class drives CLI parsing (``from_strings``), ``nnopt passes`` and
    the report (``to_dict``).

    Shared bases (``NodeSelection``, the low-rank passes' options) declare common fields once. A base
    names in ``TRAILING`` the fields it wants listed after the pass's own (dataclasses put inherited fields
    first), and a pass may reword an inherited field's help in ``HELP`` (field name → help).
    """

    TRAILING: ClassVar[tuple[str, ...]] = ()
    HELP: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_strings(cls, values: dict[str, str], pass_name: str = "") -> PassOptions:
        """Build options from ``key=value`` strings, converting each value to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            attr = key.replace("-", "_")
            if attr not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise OptionError(f"pass '{pass_name}' has no option '{key}' (options: {known})")
            kwargs[attr] = _convert(raw, hints[attr], f"{pass_name}:{key}")
        return cls.create(pass_name, **kwargs)

    @classmethod
    def from_values(cls, values: dict[str, Any], pass_name: str = "", where: str | None = None) -> PassOptions:
        """Build options from typed values (a pipeline file, the Python API), checking each against its type.

        Values are taken as they are when they fit the field's type: an int is accepted for a float, a
        list for a ``tuple[...]``, None only where the type allows it, but a bool is never a number. A
        string goes through the command-line conversion, so ``"0.3"`` works as it does in ``-p``. Keys may
        use ``-`` or ``_``.

        Args:
            values: option name → value.
            pass_name: for messages.
            where: how messages name the options' container (e.g. ``"pipeline.toml: passes[2]"``, giving
                ``pipeline.toml: passes[2].ratio: ...``); by default ``pass:option`` as on the command line.

        Raises:
            OptionError: naming the option: unknown, of the wrong type, or rejected by the pass's own
                validation (then the option that fails on its own is named, else the whole set is).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)

        def path(key: str) -> str:
            return f"{where}.{key}" if where else f"{pass_name}:{key}"

        kwargs: dict[str, Any] = {}
        given: dict[str, str] = {}  # attribute → the key as the user wrote it
        problems: list[str] = []  # every unknown or mistyped option, not the first only
        for key, value in values.items():
            attr = key.replace("-", "_")
            if attr not in fields:
                known = ", ".join(sorted(fields)) or "none"
                close = difflib.get_close_matches(attr, sorted(fields), n=1)
                hint = f"did you mean '{close[0]}'?; " if close else ""
                problems.append(f"{path(key)}: pass '{pass_name}' has no option '{key}' ({hint}options: {known})")
            elif attr in given:
                problems.append(f"{path(key)}: option '{attr}' is given twice (as '{given[attr]}' and '{key}')")
            else:
                given[attr] = key
                try:
                    kwargs[attr] = _typed_value(value, hints[attr], path(key))
                except OptionError as exc:
                    problems.append(str(exc))
        if problems:
            raise OptionError.several(problems)
        try:
            return cls.create(pass_name, **kwargs)
        except OptionError as exc:
            # __post_init__ says what is wrong but not which option: the culprit is the one that fails alone.
            for attr, value in kwargs.items():
                try:
                    cls(**{attr: value})
                except OptionError as alone:
                    raise OptionError(f"{path(given[attr])}: {_show(value)} is out of range: {alone}") from None
            if where:
                raise OptionError(f"{where}: {exc}") from None
            raise

    @classmethod
    def create(cls, pass_name: str = "", **kwargs: Any) -> PassOptions:
        """Construct, turning a TypeError for an unknown keyword into an OptionError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise OptionError(f"pass '{pass_name}' has no option '{unknown[0]}' (options: {known})")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in self.option_fields()}

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field[Any]]:
        """The fields in the order users see them: the pass's own, then the ``TRAILING`` ones."""
        fields = dataclasses.fields(cls)
        by_name = {f.name: f for f in fields}
        return [f for f in fields if f.name not in cls.TRAILING] + [by_name[n] for n in cls.TRAILING if n in by_name]

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One entry per option: name, type, default and help, for ``nnopt passes``."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in cls.option_fields():
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.append(
                {
                    "name": f.name,
                    "type": _type_name(hints[f.name]),
                    "default": _jsonable(default),
                    "help": cls.HELP.get(f.name, f.metadata.get("help", "")),
                }
            )
        return out


@dataclass(frozen=True)
class NoOptions(PassOptions):
    """For passes without options."""


#: What became of a pass in the pipeline: it changed the model and passed verification, changed nothing,
#: or was undone (it raised, broke the model, or exceeded the fidelity budget).
PassStatus: TypeAlias = Literal["applied", "unchanged", "rolled_back"]

#: What a pass did to one layer (a node, or a weight read by nodes). ``rewritten``: changed in place or
#: replaced by new nodes; ``declined``: left alone, ``reason`` says why; ``removed``: taken out of the graph
#: (its readers now read something else); ``folded``: merged into a neighbour, which absorbed its work;
#: ``moved``: the same op now sits elsewhere in the graph; ``stripped``: only metadata was dropped.
LayerAction: TypeAlias = Literal["rewritten", "declined", "removed", "folded", "moved", "stripped"]
LAYER_ACTIONS: tuple[LayerAction, ...] = typing.get_args(LayerAction)

#: A value in a layer's figures: what JSON can hold (tuples come out as lists).
Figure: TypeAlias = int | float | str | bool | None | Sequence["Figure"] | Mapping[str, "Figure"]

#: The keys ``LayerDecision.to_dict`` writes itself; figures may not reuse them.
_DECISION_KEYS = frozenset({"node", "op_type", "action", "reason"})


@dataclass(frozen=True)
class LayerDecision:
    """One line of a pass's per-layer report: which layer, what the pass did to it, why, and its numbers.

    Attributes:
        node: the node's name (a pass that names unnamed nodes by their first output says so in its doc);
            ``"(model)"`` or ``"*"`` for a decision about the whole model.
        op_type: the node's op type; ``""`` where there is no single node.
        action: one of ``LAYER_ACTIONS``.
        reason: why; required for ``declined``, optional otherwise.
        figures: the pass's own numbers (``rank``, ``weight_error``, ``bytes_before``, ...). The dict may be
            filled in while the pass runs (a refit adds its errors); its keys may not be the four above.
    """

    node: str
    op_type: str
    action: LayerAction
    reason: str = ""
    figures: dict[str, Figure] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked at run time too: plugins are not type-checked, and the report must stay one vocabulary.
        if self.action not in LAYER_ACTIONS:
            raise ValueError(f"layer action {self.action!r} is not one of {', '.join(LAYER_ACTIONS)}")
        if self.action == "declined" and not self.reason:
            raise ValueError(f"layer {self.node!r} is declined without a reason")
        self._check_figure_names()

    def _check_figure_names(self) -> None:
        clash = sorted(_DECISION_KEYS & self.figures.keys())
        if clash:
            raise ValueError(f"layer {self.node!r}: figure names {clash} are reserved")

    def int_figure(self, key: str) -> int:
        """A figure the pass stored as an integer (to sum into its stats); TypeError if it is something else."""
        value = self.figures[key]
        if isinstance(value, int | np.integer) and not isinstance(value, bool):
            return int(value)
        raise TypeError(f"layer {self.node!r}: figure {key!r} is {value!r}, not an integer")

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON for this layer: node, op_type, action, reason (when given), then the figures."""
        self._check_figure_names()  # again: figures may have been added since the decision was made
        out: dict[str, Any] = {"node": self.node, "op_type": self.op_type, "action": self.action}
        if self.reason:
            out["reason"] = self.reason
        out.update(self.figures)
        return out


@dataclass
class PassResult:
    """What a pass reports back.

    Attributes:
        modified: whether the pass changed the model. The manager skips verification when it did not.
        stats: counts with units in their names (``nodes_removed``, ``weight_bytes_saved``).
        layers: per-layer decisions; the report shows each as ``LayerDecision.to_dict()``.
        reason: why the pass left the model unchanged, when it has a reason of its own to give. Left
            empty, the pass manager states the reasons of the ``declined`` layers instead.
    """

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerDecision] = field(default_factory=list)
    reason: str = ""


@dataclass
class PassContext:
    """Everything a pass may read besides its options. Passes never read globals or the environment.

    Attributes:
        seed: the pipeline's seed; ``rng(name)`` derives an independent, deterministic stream per pass.
        samples: reference inputs (one feed dict per sample), for data-aware passes; may be empty.
        input_shapes: concrete shapes the user gave for dynamic graph inputs.
        hook: the pluggy hook relay, for passes that call other plugins.
        on_progress: where ``progress`` reports go (set by the pass manager; None: nowhere).
        analyses: the analysis cache of the model being optimized (set by the pass manager); passes reach
            it through ``analyses_for(model)``.
        reference_model: the pipeline's input model, before any pass ran (the teacher ``distill`` trains
            towards); None when the pass runs outside a pipeline. Read it, never edit it.
        labels: one integer class label per sample of ``samples``, when the data file has a ``labels``
            array (see ``nnopt.runtime.load_labels``); None otherwise.
    """

    seed: int = 0
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    hook: Any = None
    on_progress: Callable[[int, int, str], None] | None = None
    analyses: AnalysisManager | None = None
    reference_model: onnx.ModelProto | None = None
    labels: np.ndarray | None = None

    def analyses_for(self, model: Model) -> AnalysisManager:
        """The analysis cache of ``model``: the pass manager's, shared by every pass and the verification.

        A pass run on its own (no manager set ``analyses``) gets a new cache on every call, with this
        context's input shapes and default costing: nobody would invalidate a kept one between runs.
        """
        if self.analyses is not None and self.analyses.model is model:
            return self.analyses
        from nnopt.analysis.manager import AnalysisManager, AnalysisSettings

        return AnalysisManager(model, AnalysisSettings(input_shapes=dict(self.input_shapes)))

    def progress(self, done: int, total: int, item: str = "") -> None:
        """Say how far a slow pass has got: ``done`` of ``total`` layers, ``item`` the one just finished.

        Cheap enough to call per layer: the display throttles itself. Passes that take seconds on real
        models (kmeans, svd, conv-to-separable, the budget loop of quantize) call it, so long runs show progress.
        """
        if self.on_progress is not None:
            self.on_progress(done, total, item)

    def rng(self, stream: str) -> np.random.Generator:
        """A generator that depends only on the seed and ``stream`` (e.g. the pass name)."""
        digest = hashlib.sha256(f"{self.seed}:{stream}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def seed_for(self, stream: str) -> int:
        """An int seed (for scikit-learn's ``random_state``) that depends only on the seed and ``stream``."""
        return int(self.rng(stream).integers(0, 2**31 - 1))


OptionsT = TypeVar("OptionsT", bound=PassOptions)


class Pass(Generic[OptionsT]):
    """Base class of every pass, built-in or from a plugin, generic over its options class.

    Subclasses name their options in the base (``class Prune(Pass[PruneOptions])``; ``Options`` is then
    set from it, and ``self.options`` is typed), set ``name`` (stable, kebab-case: it is CLI surface; plugin
    passes use ``plugin.name``) and ``lossy``, and implement ``run``. A pass without options derives from
    ``Pass[NoOptions]`` (or plain ``Pass``). The class docstring says what the pass matches, what it
    rewrites, whether it is lossless, and its preconditions: it is shown by ``nnopt passes``.

    ``preserves`` names the analyses (``nnopt.analysis.manager``) a change by this pass leaves valid; the
    pass manager drops the others after the pass changes the model.

    ``run`` edits the model it is given in place and returns a ``PassResult``. It must be deterministic
    (randomness only from ``ctx.rng``), must not print, read files or the environment, and must never
    write into a weight array in place (graphsurgeon copies share arrays): assign new arrays instead.
    """

    name: ClassVar[str] = ""
    lossy: ClassVar[bool] = False
    # Not ClassVar[type[OptionsT]]: a class variable cannot be generic. __init_subclass__ ties the two.
    Options: ClassVar[type[PassOptions]] = NoOptions
    preserves: ClassVar[frozenset[str]] = frozenset()
    options: OptionsT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = _options_argument(cls)
        if declared is None:
            return
        if "Options" not in cls.__dict__:
            cls.Options = declared
        elif not issubclass(cls.Options, declared):
            raise TypeError(f"{cls.__name__}.Options is {cls.Options.__name__}, not the {declared.__name__} "
                            f"its base Pass[{declared.__name__}] says")

    def __init__(self, options: OptionsT | None = None) -> None:
        # The cast is what __init_subclass__ checked: Options is (a subclass of) OptionsT.
        self.options = options if options is not None else cast(OptionsT, self.Options())

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


# ---------------------------------------------------------------------------------------------- helpers
def _options_argument(cls: type) -> type[PassOptions] | None:
    """The options class in ``cls``'s own ``Pass[X]`` base, if it names one (not one a parent names)."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Pass):
            (arg,) = typing.get_args(base)
            if isinstance(arg, type) and issubclass(arg, PassOptions):
                return arg
    return None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(raw: str, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in {"none", ""} and len(non_none) < len(args):
            return None
        last_error: OptionError | None = None
        for candidate in non_none:
            try:
                return _convert(raw, candidate, where)
            except OptionError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise OptionError(f"{where}: '{raw}' is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        item = args[0] if args else str
        parts = [p for p in raw.split(",") if p]
        return tuple(_convert(p, item, where) for p in parts)
    if hint is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise OptionError(f"{where}: '{raw}' is not a boolean (use true or false)")
    if hint in (int, float):
        try:
            value = float(raw) if hint is float else int(raw, 0)
        except ValueError:
            raise OptionError(f"{where}: '{raw}' is not {'a number' if hint is float else 'an integer'}") from None
        return value
    if hint is str:
        return raw
    raise OptionError(f"{where}: options of type {hint} cannot be given on the command line")


def _typed_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` as an option of type ``hint`` (see ``PassOptions.from_values``), or an OptionError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and origin in (Union, types.UnionType) and type(None) in args:
        return None
    if isinstance(value, str) and hint is not str:
        try:
            return _convert(value, hint, where)  # as on the command line: "0.3", "true", "a,b", "none"
        except OptionError:
            pass
    elif origin in (Union, types.UnionType):
        for candidate in (a for a in args if a is not type(None)):
            try:
                return _typed_value(value, candidate, where)
            except OptionError:
                continue
    elif origin is Literal:
        # `type(...) is` so that True does not pass for 1 (bool is an int subclass).
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            item = args[0] if args else str
            return tuple(_typed_value(v, item, f"{where}[{i}]") for i, v in enumerate(value, 1))
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint in (int, bool, str):
        if type(value) is hint:  # exact: a bool is not an int here
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise OptionError(f"{where}: expected {_expected(hint)}, got {_described(value)}")


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
_EXPECTED_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _expected(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for 'expected ...' messages."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin is tuple:
        item = args[0] if args else str
        return f"a list of {_EXPECTED_PLURAL.get(item, _type_name(item))}"
    return _EXPECTED.get(hint, _type_name(hint))


def _described(value: Any) -> str:
    """A value, introduced by its type: ``the string 'abc'``, ``the number 1.5``, ``a list``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"the boolean {_show(value)}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _show(value: Any) -> str:
    """A value as a pipeline file would spell it (true/false lowercase, strings quoted)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is tuple:
        return f"list of {_type_name(args[0]) if args else 'str'}"
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
