"""The typed pass contract: LayerDecision, Pass generic over its options, shared option bases, first_line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from nnopt.analysis.selection import NodeSelection
from nnopt.errors import first_line
from nnopt.ir.model import Model
from nnopt.passes.conv_to_separable import ConvToSeparable, ConvToSeparableOptions
from nnopt.passes.svd import Svd, SvdOptions
from nnopt.pipeline.base import LAYER_ACTIONS, LayerDecision, NoOptions, Pass, PassContext, PassOptions, PassResult


def test_a_decision_serialises_core_keys_then_its_figures() -> None:
    done = LayerDecision("fc", "Gemm", "rewritten", figures={"rank": 4, "shape": [8, 6], "fit": None})
    assert done.to_dict() == {"node": "fc", "op_type": "Gemm", "action": "rewritten", "rank": 4, "shape": [8, 6],
                              "fit": None}
    assert list(done.to_dict()) == ["node", "op_type", "action", "rank", "shape", "fit"]  # no empty reason
    declined = LayerDecision("c", "Conv", "declined", "weight is shared with other nodes", {"m": 2})
    assert json.dumps(declined.to_dict()) == (
        '{"node": "c", "op_type": "Conv", "action": "declined", "reason": "weight is shared with other nodes", '
        '"m": 2}'
    )
    assert done.int_figure("rank") == 4
    with pytest.raises(TypeError, match="figure 'shape' is \\[8, 6\\], not an integer"):
        done.int_figure("shape")


def test_a_decision_checks_its_action_reason_and_figure_names() -> None:
    assert LAYER_ACTIONS == ("rewritten", "declined", "removed", "folded", "moved", "stripped")
    with pytest.raises(ValueError, match="'pushed' is not one of rewritten, declined, removed"):
        LayerDecision("t", "Transpose", "pushed")  # type: ignore[arg-type]  # what a plugin without mypy could do
    with pytest.raises(ValueError, match="'t' is declined without a reason"):
        LayerDecision("t", "Transpose", "declined")
    with pytest.raises(ValueError, match=r"figure names \['action', 'node'\] are reserved"):
        LayerDecision("t", "Transpose", "removed", figures={"node": "x", "action": "y", "n": 1})


@dataclass(frozen=True)
class _Opts(PassOptions):
    level: int = 1


class _Typed(Pass[_Opts]):
    name = "test.typed"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(modified=False, stats={"level": self.options.level})


def test_pass_takes_its_options_class_from_its_base() -> None:
    assert _Typed.Options is _Opts and _Typed().options == _Opts()
    assert _Typed(_Opts(level=3)).options.level == 3
    assert Svd.Options is SvdOptions and ConvToSeparable.Options is ConvToSeparableOptions

    class Untyped(Pass):  # a plugin pass of before: no parameter, Options set by hand, still works
        name = "test.untyped"
        Options = _Opts

    assert Untyped().options == _Opts()

    class Plain(Pass[NoOptions]):
        name = "test.plain"

    assert Plain().options == NoOptions()

    with pytest.raises(TypeError, match="Mismatched.Options is NoOptions, not the _Opts its base Pass\\[_Opts\\]"):
        class Mismatched(Pass[_Opts]):
            name = "test.mismatched"
            Options = NoOptions  # type: ignore[assignment]  # the very mistake the check is for


@dataclass(frozen=True)
class _Selecting(NodeSelection):
    ratio: float = field(default=0.5, metadata={"help": "how much"})


def test_node_selection_options_come_after_the_pass_own() -> None:
    assert [d["name"] for d in _Selecting.describe()] == ["ratio", "nodes", "exclude"]
    assert list(_Selecting(nodes=("conv*",)).to_dict()) == ["ratio", "nodes", "exclude"]
    opts = _Selecting.from_strings({"nodes": "conv*,fc", "exclude": "conv2"})
    assert [opts.selects(n) for n in ("conv1", "conv2", "fc", "relu")] == [True, False, True, False]


def test_low_rank_options_keep_their_order_and_their_pass_wording() -> None:
    # The order of before the shared base (the report's options and `nnopt passes` list them so).
    assert list(SvdOptions().to_dict()) == [
        "rank", "energy", "max_error", "min_param_saving", "min_latency_saving", "data_aware", "nodes", "exclude"
    ]
    assert list(ConvToSeparableOptions().to_dict()) == [
        "rank", "energy", "max_error", "min_flops_saving", "min_latency_saving", "data_aware", "nodes", "exclude"
    ]
    svd_help = {d["name"]: d["help"] for d in SvdOptions.describe()}
    c2s_help = {d["name"]: d["help"] for d in ConvToSeparableOptions.describe()}
    assert svd_help["rank"] == "rank r kept (capped at the full rank)"
    assert c2s_help["rank"].startswith("depth multiplier m")
    assert svd_help["exclude"] == "never these layers (shell patterns)"
    assert c2s_help["exclude"] == "never these convs (shell patterns)"
    assert SvdOptions(rank=3).rank_rule().describe() == "rank=3"
    assert ConvToSeparableOptions().rank_rule().describe() == "energy=0.99"


def test_first_line() -> None:
    assert first_line(ValueError("  bad shape\nmore detail ")) == "bad shape"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("x" * 10), 6) == "xxxxxx"
    assert first_line(ValueError("x" * 10), 6, "...") == "xxx..."
    assert first_line(ValueError("short"), 6, "...") == "short"


def test_a_subclass_of_a_pass_keeps_or_narrows_its_options() -> None:
    @dataclass(frozen=True)
    class _More(_Opts):
        extra: bool = False

    class Inherits(_Typed):
        name = "test.inherits"

    class Narrows(_Typed):
        name = "test.narrows"
        Options = _More

    assert Inherits.Options is _Opts and Narrows.Options is _More and Narrows().options == _More()
