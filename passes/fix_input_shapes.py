"""fix-input-shapes: pin the dynamic dims of graph inputs to the shapes the model will be run with."""

from __future__ import annotations

from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.pipeline.base import LayerDecision, NoOptions, Pass, PassContext, PassResult


class FixInputShapes(Pass[NoOptions]):
    """Pin the dynamic dims of graph inputs to the shapes the pipeline was given (``--input-shape``, or
    ``input_shapes`` of a pipeline file).

    For deployments that always feed one shape (a VAD's fixed chunk, a camera's frame): with the dims static,
    the shape arithmetic exporters write (Shape → Gather → Concat → Reshape) becomes constant, and
    ``fold-constants`` (in the default pipeline, after this pass) or onnxruntime at load folds it away
    (onnxruntime's ``quant_pre_process`` needed the dims fixed on PP-OCR's and Silero's models). Silero VAD
    16k, pinned to its 576-sample chunk: 0.85× the float time, 0.49–0.51× after the default pipeline and
    ``quantize`` (docs/quantize_vs_ort.md, ``nnopt-fixed``), against 0.60–0.63× with the dims left dynamic.

    Matches: every graph input named in the pipeline's input shapes. Rewrites: each dim to the given size;
    the model then accepts only those shapes (onnxruntime rejects others), so this pass is never part of a
    built-in pipeline. Numerically lossless at the pinned shapes, which the pass manager's verification
    feeds. A name that is no graph input, a rank that differs from the input's, or a size that contradicts
    a static dim is an option error; with no input shapes given, the pass changes nothing and says why.
    """

    name = "fix-input-shapes"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not ctx.input_shapes:
            return PassResult(modified=False, reason="no input shapes given (--input-shape NAME=DIMS, or "
                                                     "input_shapes in a pipeline file): nothing to pin")
        inputs = {t.name: t for t in model.graph.inputs}
        layers: list[LayerDecision] = []
        pinned = 0
        for name, dims in sorted(ctx.input_shapes.items()):
            tensor = inputs.get(name)
            if tensor is None:
                raise OptionError(f"fix-input-shapes: {name!r} is not a graph input (inputs: "
                                  f"{', '.join(sorted(inputs)) or 'none'})")
            before = list(tensor.shape) if tensor.shape is not None else None
            if before is not None and len(before) != len(dims):
                raise OptionError(f"fix-input-shapes: {name} has rank {len(before)} ({before}), the given shape "
                                  f"{list(dims)} rank {len(dims)}")
            for axis, (had, size) in enumerate(zip(before or [], dims)):
                if isinstance(had, int) and had >= 0 and had != size:
                    raise OptionError(f"fix-input-shapes: {name} dim {axis} is {had}, the given shape says {size}")
            if before == list(dims):
                layers.append(LayerDecision(name, "", "declined", "already static at the given shape"))
                continue
            tensor.shape = [int(size) for size in dims]
            pinned += 1
            layers.append(LayerDecision(name, "", "rewritten", f"{before} -> {list(dims)}"))
        return PassResult(modified=pinned > 0, stats={"inputs_pinned": pinned}, layers=layers)
