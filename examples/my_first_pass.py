"""The worked example of docs/writing-a-pass.md: a small lossless pass, registered as a plugin, used in a pipeline.

    python examples/my_first_pass.py

It builds a model with a repeated idempotent op (Relu(Relu(x))), runs the pass through nnopt's pass manager
(so it is checked, verified in onnxruntime and cost-measured like every built-in pass) and prints the report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import onnx

import nnopt
from nnopt.testing import model_from_text

#: Ops f with f(f(x)) == f(x) for every x (same attributes): the second application can go.
IDEMPOTENT_OPS = {"Relu", "Abs", "Floor", "Ceil", "Round", "Sign"}


@dataclass(frozen=True)
class Options(nnopt.PassOptions):
    ops: tuple[str, ...] = field(
        default=tuple(sorted(IDEMPOTENT_OPS)), metadata={"help": "which idempotent op types to collapse"}
    )


class CollapseRepeatedOps(nnopt.Pass[Options]):
    """Collapse f(f(x)) to f(x) for idempotent ops (Relu, Abs, Floor, Ceil, Round, Sign).

    Matches: a node whose input is produced by a node of the same op type and attributes. Rewrites: its
    readers read the first node's output instead, and the second node goes. Declines a node whose output
    is a graph output (the interface never changes). Lossless.
    """

    name = "guide.collapse-repeated-ops"
    lossy = False

    def run(self, model: nnopt.Model, ctx: nnopt.PassContext) -> nnopt.PassResult:
        layers: list[nnopt.LayerDecision] = []
        for node in model.graph.nodes:
            if node.op not in self.options.ops or node.domain not in ("", "ai.onnx"):
                continue
            first = nnopt.producer(node.inputs[0])
            if first is None or first.op != node.op or first.attrs != node.attrs:
                continue
            if node.outputs[0] in model.graph.outputs:
                # Bypassing it would rename a graph output: the model's interface never changes.
                layers.append(nnopt.LayerDecision(node.name, node.op, "declined", "its output is a graph output"))
                continue
            # Everything that read f(f(x)) now reads f(x); graph outputs included.
            nnopt.replace_tensor(model.graph, node.outputs[0], first.outputs[0])
            layers.append(nnopt.LayerDecision(node.name, node.op, "removed", f"repeats {first.name}"))
        # The bypassed nodes have no readers left; cleanup() removes them (the pipeline's dce would too).
        model.graph.cleanup()
        removed = sum(layer.action == "removed" for layer in layers)
        return nnopt.PassResult(modified=removed > 0, stats={"nodes_removed": removed}, layers=layers)


@nnopt.hookimpl
def nnopt_register_passes() -> list[type[nnopt.Pass]]:
    return [CollapseRepeatedOps]


def demo_model() -> onnx.ModelProto:
    return model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 8] y) {
          a = Relu(x)
          b = Relu(a)
          c = Abs(b)
          d = Abs(c)
          y = Sigmoid(d)
        }
        """
    )


def main() -> int:
    # An installed plugin is found through its entry point; a script can also register a module directly.
    plugins = nnopt.build_plugins(extra=[sys.modules[__name__]])
    model, report = nnopt.Pipeline(["guide.collapse-repeated-ops"]).run(demo_model(), plugins=plugins)
    print(report.format_table())
    ops = [n.op for n in model.graph.nodes]
    print(f"ops after the pass: {ops}")
    record = report.passes[0]
    assert record.status == "applied" and ops == ["Relu", "Abs", "Sigmoid"], (record.status, record.reason, ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
