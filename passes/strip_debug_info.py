"""strip-debug-info: drop per-node doc strings and metadata_props (exporter debugging information)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import onnx

from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassOptions, PassResult


@dataclass(frozen=True)
class StripDebugInfoOptions(PassOptions):
    keep: tuple[str, ...] = field(
        default=(),
        metadata={"help": "node metadata keys to keep (shell patterns, e.g. namespace or pkg.torch.onnx.name_*)"},
    )

    def __post_init__(self) -> None:
        for pattern in self.keep:
            # An empty or space-padded key is a typo in a pipeline file; it would silently keep nothing.
            if not pattern or pattern != pattern.strip():
                raise OptionError(f"strip-debug-info:keep: {pattern!r} is not a metadata key (no empty keys, "
                                  "no surrounding spaces)")

    def keeps(self, key: str) -> bool:
        """Whether metadata ``key`` matches a ``keep`` pattern (shell-style, the whole key)."""
        return any(fnmatchcase(key, pattern) for pattern in self.keep)


def _serialized_size(doc_string: str, props: list[tuple[str, str]]) -> int:
    """The bytes a node's doc string and metadata_props take in the file (protobuf fields are additive)."""
    node = onnx.NodeProto()
    if doc_string:  # NOTE: proto2 serialises a field assigned even "" (two bytes), so set only a real one
        node.doc_string = doc_string
    for key, value in props:
        node.metadata_props.add(key=key, value=value)
    return node.ByteSize()


class StripDebugInfo(Pass[StripDebugInfoOptions]):
    """Drop per-node doc strings and metadata_props: debugging information, not part of the computation.

    Matches: every node, in the main graph and in every subgraph, that carries a doc string or
    metadata_props; PyTorch's exporter writes several per node (``pkg.torch.onnx.stack_trace``, the
    source lines that created it, is most of it: 608 KB of the 2.8 MB silero_vad_op18_ifless).
    Rewrites: removes the doc string and every metadata entry whose key matches no ``keep`` pattern.
    The model's own doc string and metadata_props (labels, licences: user data) and the graph's doc
    string stay. Lossless: the computation is untouched. Reports per node what went and, in total,
    the serialised bytes removed (nested subgraphs shrink by a few bytes more of length prefixes).
    """

    name = "strip-debug-info"
    lossy = False
    # Doc strings and metadata change no op, shape, weight or edge: the cost report, the shapes and the
    # dataflow view of the stripped model are those of the model before.
    preserves = frozenset({"cost", "shapes", "dataflow"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        kept_extras: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        layers: list[LayerDecision] = []
        doc_strings = entries_removed = entries_kept = bytes_removed = 0
        seen: set[str] = set()
        # Only nodes that still exist count: extras of nodes an earlier pass removed are never written out.
        for graph in model.all_graphs():
            for node in graph.nodes:
                extra = model.node_extras.get(node.name)
                if extra is None or node.name in seen:
                    continue
                seen.add(node.name)
                doc_string, props = extra
                keep = [(k, v) for k, v in props if opts.keeps(k)]
                removed_keys = [k for k, _ in props if not opts.keeps(k)]
                entries_kept += len(keep)
                if keep:
                    kept_extras[node.name] = ("", keep)
                if not doc_string and not removed_keys:
                    continue
                saved = _serialized_size(doc_string, props) - _serialized_size("", keep)
                doc_strings += int(bool(doc_string))
                entries_removed += len(removed_keys)
                bytes_removed += saved
                figures: dict[str, Figure] = {"doc_string": bool(doc_string), "metadata_removed": removed_keys,
                                              "bytes_removed": saved}
                if keep:
                    figures["metadata_kept"] = [k for k, _ in keep]
                layers.append(LayerDecision(node.name, node.op, "stripped", figures=figures))
        model.node_extras = kept_extras
        stats = {
            "nodes_stripped": len(layers),
            "doc_strings_removed": doc_strings,
            "metadata_entries_removed": entries_removed,
            "metadata_entries_kept": entries_kept,
            "bytes_removed": bytes_removed,
        }
        return PassResult(modified=bool(layers), stats=stats, layers=layers)
