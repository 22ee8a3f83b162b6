"""Energy per inference (nnopt.cost.energy), `nnopt analyze --batch` with throughput, and `--objective energy`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnopt.cli import main
from nnopt.cost import BUILTIN_PROFILES, analyze
from nnopt.cost.energy import MAC_PJ, OP_PJ, EnergyFigures, sram_pj_per_byte
from nnopt.cost.hardware import load_profile, profile_from_dict, write_profile
from nnopt.errors import InputError
from nnopt.search.candidate import CandidateResult
from nnopt.search.report import choose

RPI4 = BUILTIN_PROFILES["rpi4"]  # no runtime modelled: every node is costed as written; 1 MiB on-chip


def one_conv(batch: int | str = 1, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv 3x3, 4 filters, no padding -> y[batch,4,6,6]: 3,888 MACs per sample."""
    w = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, onnx.helper.tensor_dtype_to_np_dtype(dtype)), "W")
    conv = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3])
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", dtype, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", dtype, [batch, 4, 6, 6])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_record(report: Any) -> dict[str, Any]:
    return next(n for n in report.nodes if n["op_type"] in ("Conv", "QLinearConv"))


# ---------------------------------------------------------------------------------------------- the figures
def test_the_45nm_figures_as_published() -> None:
    # Horowitz, ISSCC 2014: fp32 mult 3.7 + add 0.9; fp16 1.1 + 0.4; int8 mult 0.2 summed in int32 (add 0.1).
    assert MAC_PJ == {"fp32": 4.6, "fp16": 1.5, "int8": 0.3, "int32": 3.2}
    assert OP_PJ == {"fp32": 0.9, "fp16": 0.4, "int8": 0.03, "int32": 0.1}
    # 64-bit cache reads: 8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ; larger caches at the 1 MB figure.
    assert [sram_pj_per_byte(n) for n in (4096, 8192, 20_000, 1 << 20, 4 << 20)] == [1.25, 1.25, 2.5, 12.5, 12.5]
    assert EnergyFigures(cache_bytes=1).offchip_pj_per_byte == 1300 / 8  # DRAM: 1.3 nJ per 64 bits


def test_energy_of_one_conv_by_hand() -> None:
    report = analyze(one_conv(), hardware=RPI4)
    conv = conv_record(report)
    assert (conv["macs"], conv["flops"], conv["dtype"]) == (3888, 7776, "fp32")
    # Bytes: x 3*8*8*4 = 768, W 4*3*3*3*4 = 432, y 4*6*6*4 = 576; all on chip (1 MiB) at 12.5 pJ/B.
    assert conv["bytes_moved"] == 768 + 432 + 576 and conv["offchip_bytes"] == 0
    expected_pj = 3888 * 4.6 + 1776 * 12.5  # 17,884.8 + 22,200 pJ: no operations besides the MACs
    assert conv["energy_j"] == pytest.approx(expected_pj * 1e-12, rel=1e-12)
    assert report.totals["energy_j"] == pytest.approx(40_084.8e-12, rel=1e-12)
    assert report.to_dict()["hardware"]["energy"]["cache_bytes"] == 1 << 20


def test_bytes_beyond_the_cache_are_priced_at_dram() -> None:
    def energy(cache: int) -> tuple[int, float]:
        profile = profile_from_dict({"name": "tiny", "peak_flops_per_s": 1e9, "energy": {"cache_bytes": cache}})
        conv = conv_record(analyze(one_conv(), hardware=profile))
        return conv["offchip_bytes"], conv["energy_j"] * 1e12

    # 512 B: the weights (432 B, all of them) stay on chip; x (768 B) and y (576 B) each overflow it.
    offchip, pj = energy(512)
    assert offchip == 768 + 576
    assert pj == pytest.approx(3888 * 4.6 + 432 * 1.25 + 1344 * 162.5)
    # 256 B: the weights no longer fit either: every byte goes to DRAM.
    offchip, pj = energy(256)
    assert offchip == 1776
    assert pj == pytest.approx(3888 * 4.6 + 1776 * 162.5)


def test_fp16_and_int8_nodes_are_priced_at_their_type() -> None:
    half = conv_record(analyze(one_conv(dtype=TensorProto.FLOAT16), hardware=RPI4))
    assert half["dtype"] == "fp16" and half["bytes_moved"] == 888
    assert half["energy_j"] * 1e12 == pytest.approx(3888 * 1.5 + 888 * 12.5)

    scalar = {n: numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in (
        ("xs", 0.02, np.float32), ("xz", 128, np.uint8), ("ws", 0.01, np.float32), ("wz", 0, np.int8),
        ("ys", 0.05, np.float32), ("yz", 128, np.uint8))}
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "W")
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "W", "ws", "wz", "ys", "yz"], ["y"], kernel_shape=[3, 3])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 4, 6, 6])],
                              [w, *scalar.values()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = conv_record(analyze(model, hardware=RPI4))
    # x 192 B, W 108 B + three float scales (12 B) + three zero points (3 B), y 144 B.
    assert (q["dtype"], q["macs"], q["bytes_moved"]) == ("int8", 3888, 192 + 123 + 144)
    others = q["flops"] - 2 * q["macs"]
    assert q["energy_j"] * 1e12 == pytest.approx(3888 * 0.3 + others * 0.03 + 459 * 12.5)


def test_nodes_a_runtime_fuses_cost_no_energy() -> None:
    conv = helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3])
    relu = helper.make_node("Relu", ["c"], ["y"])
    model = one_conv()
    del model.graph.node[:]
    model.graph.node.extend([conv, relu])
    x86 = analyze(model, hardware=BUILTIN_PROFILES["x86-avx2-2core"])  # no fusion in the generic runtime
    profile = profile_from_dict({"name": "ort", "peak_flops_per_s": 1e11, "runtime": "onnxruntime"})
    ort = analyze(model, hardware=profile)  # onnxruntime fuses the Relu into the Conv
    relu_x86, relu_ort = (next(n for n in r.nodes if n["op_type"] == "Relu") for r in (x86, ort))
    assert relu_ort["kernel"] == "fused" and relu_ort["energy_j"] == 0.0
    # Relu: 144 operations at 0.9 pJ, 576 B read + 576 B written at 12.5 pJ/B (4 MiB cache).
    assert relu_x86["energy_j"] * 1e12 == pytest.approx(144 * 0.9 + 1152 * 12.5)


# ---------------------------------------------------------------------------------------------- profile files
def test_profile_files_carry_energy_figures(tmp_path: Path) -> None:
    profile = profile_from_dict({"name": "board", "peak_flops_per_s": 2e9,
                                 "energy": {"cache_bytes": 65536, "mac_pj": {"int8": 0.25}, "offchip_pj_per_byte": 50}})
    assert profile.energy.mac_pj == {**MAC_PJ, "int8": 0.25}
    assert profile.energy.onchip_pj_per_byte == 12.5  # 64 KiB: the table's next size up is 1 MB
    write_profile(profile, tmp_path / "board.json")
    assert load_profile(tmp_path / "board.json").energy == profile.energy
    for energy, words in (({"cache_bytes": 0}, "cache_bytes must be positive"),
                          ({"cache_bytes": 8, "mac_pj": {"fp64": 1}}, "prices needed for exactly"),
                          ({"cache": 8}, "unknown key 'energy.cache'"), ({}, "missing key 'energy.cache_bytes'"),
                          ({"cache_bytes": 8, "op_pj": {"fp32": -1}}, "prices at least 0")):
        with pytest.raises(InputError, match=words):
            profile_from_dict({"name": "bad", "peak_flops_per_s": 1e9, "energy": energy})


# ---------------------------------------------------------------------------------------------- batch
def test_batch_scales_the_cost_and_gives_throughput() -> None:
    one, eight = (analyze(one_conv("N"), hardware=RPI4, batch=b) for b in (1, 8))
    assert eight.input_shapes == {"x": [8, 3, 8, 8]} and eight.batch == 8
    assert eight.totals["macs"] == 8 * one.totals["macs"] == 8 * 3888
    # rpi4's roofline: per node max(FLOPs / 48e9, bytes / 12.8e9); the conv is compute-bound at both batches.
    assert one.totals["latency_s"] == pytest.approx(7776 / 48e9)
    assert eight.totals["throughput_per_s"] == pytest.approx(8 / eight.totals["latency_s"])
    assert one.totals["throughput_per_s"] == pytest.approx(48e9 / 7776)  # 1 / latency at batch 1
    # Weights are read once per run: energy per inference falls with the batch (432 B of weights shared by 8).
    assert eight.totals["energy_j"] * 1e12 == pytest.approx(8 * 3888 * 4.6 + (8 * 768 + 432 + 8 * 576) * 12.5)
    assert eight.totals["energy_j"] / 8 < one.totals["energy_j"]


def test_batch_overrides_a_fixed_batch_of_one_and_refuses_any_other(tmp_path: Path, capsys: Any) -> None:
    fixed_one = analyze(one_conv(1), hardware=RPI4, batch=4)
    assert fixed_one.input_shapes == {"x": [4, 3, 8, 8]} and fixed_one.totals["macs"] == 4 * 3888
    with pytest.raises(InputError, match="batch dim fixed at 2 by the model"):
        analyze(one_conv(2), hardware=RPI4, batch=4)
    assert analyze(one_conv(2), hardware=RPI4, batch=2).totals["macs"] == 2 * 3888  # already that batch
    path = tmp_path / "b2.onnx"
    onnx.save(one_conv(2), path)
    assert main(["analyze", str(path), "--batch", "4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().count("\n") == 0
    assert err.startswith("nnopt: error: --batch 4: input 'x' has its batch dim fixed at 2 by the model")
    with pytest.raises(InputError, match="fixed at 2 by the given shape"):
        analyze(one_conv("N"), hardware=RPI4, input_shapes={"x": [2, 3, 8, 8]}, batch=4)


def test_a_fixed_first_dim_beside_a_dynamic_batch_is_not_batched() -> None:
    # A recurrent state [layers, batch, hidden] beside a dynamic input: only the dynamic input is batched.
    model = one_conv("N")
    model.graph.input.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 16]))
    model.graph.node.append(helper.make_node("Identity", ["state"], ["state_out"]))
    model.graph.output.append(helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, 1, 16]))
    report = analyze(model, hardware=RPI4, batch=8)
    assert report.input_shapes == {"x": [8, 3, 8, 8], "state": [2, 1, 16]}
    assert report.totals["macs"] == 8 * 3888


def test_analyze_batch_measures_at_that_batch(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "conv.onnx"
    onnx.save(one_conv("N"), path)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(2, 1, 3, 8, 8)).astype(np.float32))
    assert main(["analyze", str(path), "--batch", "16", "--measure", "--runs", "3", "--json",
                 "--data", str(tmp_path / "data.npz"), "--hardware", "rpi4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch"] == 16 and data["input_shapes"] == {"x": [16, 3, 8, 8]}
    assert data["totals"]["macs"] == 16 * 3888
    assert data["totals"]["throughput_per_s"] == pytest.approx(16 / data["totals"]["latency_s"])
    measured = data["measured"]
    assert measured["batch"] == 16 and measured["throughput_per_s"] == pytest.approx(16 / measured["median_s"])
    assert main(["analyze", str(path), "--batch", "16", "--hardware", "rpi4"]) == 0
    text = capsys.readouterr().out
    latency = 16 * 7776 / 48e9
    assert f"batch 16: estimated latency {latency * 1e6:.3f} us per batch, throughput {16 / latency:,.1f}" in text
    assert "estimated energy" in text and "est. energy (nJ)" in text


# ---------------------------------------------------------------------------------------------- the search
def test_objective_energy_chooses_by_estimated_energy() -> None:
    def result(key: str, size: int, energy: float) -> CandidateResult:
        return CandidateResult(key, {"l/weights": key}, 0.99, 0.0, size_bytes=size, flops=1e6, latency_s=1e-4,
                               energy_j=energy)

    # k-means codes shrink the file but decode to float weights (float MACs); int8 halves neither less.
    k4, int8 = result("k4", 30_000, 20e-6), result("int8", 60_000, 6e-6)
    assert choose([k4, int8], "size", 0.01)[0] is k4
    assert choose([k4, int8], "energy", 0.01)[0] is int8
    assert k4.objective("energy") == 20e-6
    assert CandidateResult.from_dict({**k4.to_dict(), "energy_j": None}).objective("energy") == float("inf")


def test_a_search_with_objective_energy_records_and_minimises_it(tmp_path: Path, capsys: Any) -> None:
    from report_schema import validate

    digits = Path(__file__).resolve().parents[1] / "examples" / "digits"
    x = np.load(digits / "digits_test.npz")["x"]
    y = np.load(digits / "digits_test_labels.npy")
    np.savez(tmp_path / "calib.npz", x=x[:200])
    np.savez(tmp_path / "eval.npz", x=x[200:], labels=y[200:])
    report_path = tmp_path / "report.json"
    code = main(["optimize", str(digits / "digits_cnn.onnx"), "-o", str(tmp_path / "out.onnx"), "--level", "1",
                 "--data", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"), "--max-drop", "0.01",
                 "--metric", "top1", "--objective", "energy", "--workers", "1", "--report", str(report_path), "-q"])
    assert code == 0
    report = json.loads(report_path.read_text())
    validate(report)
    assert report["objective"] == "energy"
    candidates = {c["key"]: c for c in report["candidates"]}
    assert all(c["energy_j"] > 0 for c in candidates.values())
    chosen = candidates[report["chosen"]]
    # int8 everywhere: int8 MACs at 0.3 pJ instead of 4.6, and a quarter of the weight bytes.
    assert set(chosen["config"].values()) == {"int8"}
    assert chosen["energy_j"] < 0.5 * report["original"]["energy"]
    assert chosen["energy_j"] == min(c["energy_j"] for c in candidates.values() if c["drop"] <= 0.01)


def test_a_model_exported_at_batch_one_is_timed_at_the_batch(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "b1.onnx"
    onnx.save(one_conv(1), path)
    assert main(["analyze", str(path), "--batch", "4", "--measure", "--runs", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # The declared batch of 1 is made dynamic in the copy that is timed; the file is not changed.
    assert data["input_shapes"] == {"x": [4, 3, 8, 8]} and data["measured"]["batch"] == 4
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_the_machines_last_level_cache_is_read_from_linux(tmp_path: Path) -> None:
    from nnopt.cost.energy import machine_cache_bytes

    for index, (level, size) in enumerate((("1", "32K"), ("2", "1024K"), ("3", "32M"), ("1", "48K"))):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "size").write_text(size + "\n")
    assert machine_cache_bytes(str(tmp_path)) == 32 << 20
    assert machine_cache_bytes(str(tmp_path / "none")) is None
