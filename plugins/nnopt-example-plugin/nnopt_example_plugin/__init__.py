"""An example nnopt plugin: what a third-party package puts in its own distribution.

It provides two passes, ``example.cancel-transposes`` (merges and cancels the Transpose pairs that
NHWC-converted models such as tf2onnx output are full of; in ``cancel_transposes.py``) and
``example.strip-doc-strings``, a cost rule for the custom op ``com.example.FancyOp`` and an
``example-npu`` hardware profile.

Install it next to nnopt (``pip install plugins/nnopt-example-plugin``) and ``nnopt plugins`` lists it;
the entry point ``nnopt.plugins: example = nnopt_example_plugin`` in its pyproject.toml is how nnopt finds
it. Everything it uses comes from the ``nnopt`` import surface.
"""

from __future__ import annotations

from nnopt import Cost, CostContext, CostRule, HardwareProfile, Model, Pass, PassContext, PassResult, hookimpl

from .cancel_transposes import CancelTransposes


class StripDocStrings(Pass):
    """Remove doc strings from the model, its graph and its nodes.

    Matches: any model with doc strings. Rewrites: clears them (metadata only, the computation is
    untouched). Lossless.
    """

    name = "example.strip-doc-strings"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cleared = sum(1 for extra in model.node_extras.values() if extra[0])
        cleared += int(bool(model.doc_string)) + int(bool(model.graph.doc_string))
        model.doc_string = ""
        model.graph.doc_string = ""
        model.node_extras = {name: ("", props) for name, (_, props) in model.node_extras.items()}
        return PassResult(modified=cleared > 0, stats={"doc_strings_removed": cleared})


def _fancy_op_cost(ctx: CostContext) -> Cost:
    """com.example.FancyOp: one multiply-add per output element, i.e. 2 FLOPs per element."""
    elements = ctx.output_numel(0)
    return Cost(macs=elements, flops=2 * elements)


@hookimpl
def nnopt_register_passes() -> list[type[Pass]]:
    return [CancelTransposes, StripDocStrings]


@hookimpl
def nnopt_register_cost_rules() -> list[CostRule]:
    return [CostRule("FancyOp", "com.example", fn=_fancy_op_cost)]


@hookimpl
def nnopt_register_hardware() -> list[HardwareProfile]:
    return [
        HardwareProfile(
            name="example-npu",
            peak_flops=4e12,
            bandwidth=25.6e9,
            description="an imaginary 4 TFLOP/s accelerator with 25.6 GB/s memory, for the example only",
        )
    ]
