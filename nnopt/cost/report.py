"""The cost report: per-node records, totals and notes, as a dict or a plain-text table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nnopt import errors
from nnopt.cost.hardware import HardwareProfile


@dataclass
class CostReport:
    """The result of :func:`analyze`.

    Attributes:
        totals: Model-wide figures: ``params, macs, flops, weight_bytes, activation_bytes, bytes_moved,
            offchip_bytes, latency_s, energy_j, throughput_per_s, arithmetic_intensity, nodes, uncosted_nodes``.
        nodes: One dict per main-graph node in topological order, with ``name, op_type, domain, params,
            macs, flops, weight_bytes, input_bytes, output_bytes, bytes_moved, offchip_bytes,
            arithmetic_intensity, latency_s, energy_j, dtype (the data-type class energy is priced in),
            bound ("compute"/"memory"/""), kernel (see ``nnopt.cost.runtime_kernels.kernel_classes``),
            output_shapes, costed, extra, outputs`` (``outputs``: the node's output tensor names, which
            identify it where node names are empty or repeated).
        notes: Assumptions made and things not counted, one sentence each.
        hardware: The profile the latency and energy estimates used.
        input_shapes: The concrete graph-input shapes the analysis used.
        batch: The samples one run processes (``analyze(batch=N)``): the figures are those of one run, and
            ``throughput_per_s`` is batch ÷ latency.

    ``to_dict`` also holds ``uncosted``: ``{"count", "nodes"}``, the nodes that could not be costed.
    """

    totals: dict[str, float | int]
    nodes: list[dict[str, Any]]
    notes: list[str]
    hardware: HardwareProfile
    input_shapes: dict[str, list[int]]
    batch: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``totals, nodes, notes, hardware, input_shapes, batch``."""
        return {
            "totals": dict(self.totals),
            "nodes": [dict(node) for node in self.nodes],
            "notes": list(self.notes),
            "hardware": self.hardware.to_dict(),
            "input_shapes": {name: list(dims) for name, dims in self.input_shapes.items()},
            "uncosted": {"count": len(self.uncosted), "nodes": self.uncosted},
            "batch": self.batch,
        }

    @property
    def uncosted(self) -> list[str]:
        """Names of the main-graph nodes that could not be costed (no rule, unknown shapes, a failing rule):
        they count 0 FLOPs, so the totals are a lower bound."""
        return [node["name"] for node in self.nodes if not node["costed"]]

    def uncosted_warning(self) -> str | None:
        """One loud line saying how many nodes (and which) could not be costed, or None when all were."""
        names = self.uncosted
        if not names:
            return None
        shown = ", ".join(names[:_WARNING_NAMES]) + (", ..." if len(names) > _WARNING_NAMES else "")
        return (
            f"{len(names)} of {len(self.nodes)} node(s) could not be costed and count 0 FLOPs: the FLOPs and "
            f"latency totals are a lower bound (give the input shapes with --input-shape or --data): {shown}"
        )

    def format_table(self, max_rows: int | None = None) -> str:
        """A per-node table, a totals line and the notes, as plain text.

        Args:
            max_rows: Show at most this many nodes: the most expensive by estimated latency (then FLOPs),
                still in graph order. None shows every node.
        """
        rows = list(enumerate(self.nodes))
        if max_rows is not None and len(rows) > max_rows:
            ranked = sorted(rows, key=lambda r: (-r[1]["latency_s"], -r[1]["flops"], r[0]))
            rows = sorted(ranked[: max(0, max_rows)], key=lambda r: r[0])
        total_latency = float(self.totals["latency_s"]) or 1.0
        scale, unit = time_unit(total_latency)  # one unit for the whole column and the total
        joules, joule_unit = energy_unit(float(self.totals.get("energy_j", 0.0)))
        header = [*_HEADER[:-3], f"est. latency ({unit})", "% of latency", f"est. energy ({joule_unit})"]
        table = [header] + [_row(index, node, total_latency, scale, joules) for index, node in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(widths[i]) if i in _LEFT else cell.rjust(widths[i]) for i, cell in enumerate(row)
            )
            for row in table
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        hidden = len(self.nodes) - len(rows)
        if hidden > 0:
            shown = {i for i, _ in rows}
            rest = sum(n["latency_s"] for i, n in enumerate(self.nodes) if i not in shown)
            lines.append(
                f"... {hidden} more nodes not shown ({100 * rest / total_latency:.1f}% of estimated latency)"
            )
        lines.extend(self._footer())
        return "\n".join(lines)

    def _footer(self) -> list[str]:
        """The totals, hardware, input-shape and notes lines under the table."""
        t = self.totals
        hw = self.hardware
        bandwidth = f", {_si(hw.bandwidth, 'B/s')}" if hw.bandwidth is not None else ", bandwidth not given"
        lines = [
            "",
            f"total: {t['nodes']} nodes, {_si(t['params'])} params ({_si(t['weight_bytes'], 'B')} weights), "
            f"{_si(t['macs'])} MACs, {_si(t['flops'])} FLOPs, {_si(t['activation_bytes'], 'B')} activations, "
            f"{t['arithmetic_intensity']:.1f} FLOP/B, estimated latency {_format_seconds(t['latency_s'])}, "
            f"estimated energy {_format_joules(float(t.get('energy_j', 0.0)))} "
            f"({_si(t.get('offchip_bytes', 0), 'B')} off-chip)",
            f"hardware: {hw.name} ({_si(hw.peak_flops, 'FLOP/s')}{bandwidth}, {_si(hw.energy.cache_bytes, 'B')} "
            "on-chip; energy from 45 nm-era figures: an estimate, not a measurement)",
        ]
        if self.batch != 1:
            per = float(t.get("energy_j", 0.0)) / self.batch
            lines.append(f"batch {self.batch}: estimated latency {_format_seconds(t['latency_s'])} per batch, "
                         f"throughput {t.get('throughput_per_s', 0.0):,.1f} inferences/s, energy "
                         f"{_format_joules(per)} per inference")
        if self.input_shapes:
            shapes = ", ".join(
                f"{n}={'x'.join(map(str, d)) or 'scalar'}" for n, d in self.input_shapes.items()
            )
            lines.append(f"input shapes: {shapes}")
        warning = self.uncosted_warning()
        if warning is not None:
            lines.append(f"WARNING: {warning}")
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        return lines


#: How many uncosted node names ``uncosted_warning`` lists.
_WARNING_NAMES = 8

_HEADER = ["#", "name", "op", "output shape", "params", "MACs", "FLOPs", "out bytes", "FLOP/B", "latency", "%",
           "energy"]
#: Text columns (name, op, output shape) are left-aligned; figures are right-aligned.
_LEFT = {1, 2, 3}


def _row(index: int, node: dict[str, Any], total_latency: float, scale: float, joules: float) -> list[str]:
    op = f"{node['domain']}:{node['op_type']}" if node["domain"] else node["op_type"]
    return [
        str(index),
        _truncate(node["name"], 36),
        _truncate(op, 24),
        _truncate(_format_shapes(node["output_shapes"]), 24),
        _si(node["params"]),
        _si(node["macs"]),
        _si(node["flops"]) + ("" if node["costed"] else "?"),
        _si(node["output_bytes"], "B"),
        f"{node['arithmetic_intensity']:.1f}",
        f"{node['latency_s'] / scale:.3f}",
        f"{100 * node['latency_s'] / total_latency:.1f}",
        f"{node.get('energy_j', 0.0) / joules:.3f}",
    ]


def _si(value: float | None, unit: str = "") -> str:
    """A number with an SI prefix: 10188864 -> '10.19M', (6750000, "B") -> '6.75 MB'."""
    if value is None:
        return "-"
    space = " " if unit else ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{space}{prefix}{unit}"
    return f"{value:g}{space}{unit}" if isinstance(value, float) else f"{value}{space}{unit}"


def time_unit(seconds: float) -> tuple[float, str]:
    """The unit a duration (and a table of durations summing to it) reads best in: ``(1e-6, "us")``."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return scale, unit
    return 1e-9, "ns"


def energy_unit(joules: float) -> tuple[float, str]:
    """The unit an energy (and a table of energies summing to it) reads best in: ``(1e-6, "uJ")``."""
    for scale, unit in ((1.0, "J"), (1e-3, "mJ"), (1e-6, "uJ")):
        if joules >= scale:
            return scale, unit
    return 1e-9, "nJ"


def _format_joules(joules: float) -> str:
    scale, unit = energy_unit(joules)
    return f"{joules / scale:.3f} {unit}"


def _format_seconds(seconds: float) -> str:
    scale, unit = time_unit(seconds)
    return f"{seconds / scale:.3f} {unit}"


def _format_shapes(shapes: list[list[int] | None]) -> str:
    return " ".join("?" if s is None else "x".join(map(str, s)) or "scalar" for s in shapes)


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 2] + ".."



#: How many example names a note lists before "...".
_NOTE_EXAMPLES = 3


def examples(names: list[str]) -> str:
    """A few of ``names``, quoted, for a note: ``'a', 'b', 'c', ...``."""
    shown = ", ".join(f"'{n}'" for n in names[:_NOTE_EXAMPLES])
    return shown + (", ..." if len(names) > _NOTE_EXAMPLES else "")


def first_line(exc: BaseException, width: int = 200) -> str:
    """The first line of an exception's message, cut to ``width`` (ending in "..."), for a note."""
    return errors.first_line(exc, width, "...")


def cut(line: str, width: int = 200) -> str:
    """``line``, ending in "..." when longer than ``width``."""
    return line if len(line) <= width else line[: width - 3] + "..."
