"""Write faults (issue #13): exit 2 with the OS's message, nothing partial on disk, the input untouched."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.cli import main
from nnopt.ir.model import load_model, save_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "small_cnn.onnx"
DATA_NAME = re.compile(r"o\.onnx\.[0-9a-f]{16}\.data")


def optimize(*args: str) -> int:
    return main(["optimize", str(EXAMPLE), "-p", "dce", "-q", *args])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def fail_writes_under(folder: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """onnx.save_model raises OSError(code) for files under ``folder`` (as a full disk would), works elsewhere."""
    real = onnx.save_model

    def save(proto, f, *args, **kwargs):
        if str(f).startswith(str(folder)):
            raise OSError(code, os.strerror(code), str(f))
        return real(proto, f, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save)


def external_copy(folder: Path) -> Path:
    """small_cnn saved with its weights in ``m.onnx.data`` (onnx's usual layout)."""
    folder.mkdir(exist_ok=True)
    onnx.save_model(onnx.load(str(EXAMPLE)), str(folder / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    return folder / "m.onnx"


# ---------------------------------------------------------------------------------------------- --report
def test_unwritable_report_writes_no_model(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "o.onnx"
    assert optimize("-o", str(out), "--report", str(tmp_path / "file" / "r.json")) == 2
    assert error_line(capsys) == f"nnopt: error: {tmp_path / 'file' / 'r.json'}: cannot write: Not a directory: {tmp_path / 'file'}"
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no model, no temporary file


def test_failed_model_write_leaves_no_report(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    fail_writes_under(out_dir, monkeypatch, errno.ENOSPC)
    assert optimize("-o", str(out_dir / "o.onnx"), "--report", str(tmp_path / "r.json")) == 2
    assert error_line(capsys) == f"nnopt: error: {out_dir / 'o.onnx'}: cannot write: No space left on device"
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out_dir) == []  # neither output, no staged report


def test_report_and_model_are_both_written(tmp_path):
    assert optimize("-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")) == 0
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "r.json"]


# ---------------------------------------------------------------------------------------------- OS failures
@pytest.mark.parametrize(("code", "message"), [(errno.ENOSPC, "No space left on device"),
                                               (errno.EFBIG, "File too large"),
                                               (errno.EROFS, "Read-only file system")])
def test_os_write_failure_is_exit_2_with_the_os_message(tmp_path, capsys, monkeypatch, code, message):
    fail_writes_under(tmp_path, monkeypatch, code)
    assert optimize("-o", str(tmp_path / "o.onnx")) == 2
    assert error_line(capsys) == f"nnopt: error: {tmp_path / 'o.onnx'}: cannot write: {message}"
    assert os.listdir(tmp_path) == []


def test_read_only_folder_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: chmod does not stop writes (the failure is simulated above)")
        assert optimize("-o", str(folder / "o.onnx")) == 2
        assert error_line(capsys) == f"nnopt: error: {folder / 'o.onnx'}: cannot write: Permission denied: {folder}"
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_same_path_for_model_and_report_is_refused(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert optimize("-o", str(out), "--report", str(out)) == 2
    assert error_line(capsys) == (f"nnopt: error: {out}: two of -o, --report and --html name the same file; "
                                  "choose different paths")
    assert os.listdir(tmp_path) == []


def test_output_under_a_regular_file_is_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "o.onnx"
    assert optimize("-o", str(out)) == 2
    assert error_line(capsys) == f"nnopt: error: {out}: cannot write: Not a directory: {tmp_path / 'file'}"
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------------------------------- refused outputs
def test_special_file_output_is_refused(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert optimize("-o", str(fifo)) == 2
    assert error_line(capsys) == (
        f"nnopt: error: {fifo}: is a special file (a device, pipe or socket); refusing to replace it"
    )
    assert os.listdir(tmp_path) == ["pipe"] and not fifo.is_file()  # still the pipe


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_output_onto_the_inputs_external_data_is_refused(tmp_path, capsys, flag):
    src = external_copy(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    args = ["-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")]
    args[args.index(flag) + 1] = str(tmp_path / "m.onnx.data")
    assert main(["optimize", str(src), "-p", "dce", "-q", *args]) == 2
    assert error_line(capsys) == (
        f"nnopt: error: {tmp_path / 'm.onnx.data'}: the output would overwrite the input model's external data; "
        "choose another path"
    )
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


# ---------------------------------------------------------------------------------------------- external data
def test_external_data_is_named_by_content_and_replaced_cleanly(tmp_path, monkeypatch):
    model = load_model(EXAMPLE)
    out = tmp_path / "o.onnx"
    save_model(model, out, external_data=True)
    first = sorted(os.listdir(tmp_path))
    assert len(first) == 2 and DATA_NAME.fullmatch(first[1])
    monkeypatch.chdir(tmp_path)  # re-running in the output folder works (onnx checks names in the cwd)
    save_model(model, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == first  # same weights, same name
    weight = next(t for t in model.graph.tensors().values() if hasattr(t, "values") and t.values.size > 1)
    weight.values = weight.values * 2
    save_model(model, out, external_data=True)
    second = sorted(os.listdir(tmp_path))
    assert len(second) == 2 and second[1] != first[1]  # the old data file is gone with the old model
    np.testing.assert_array_equal(load_model(out).graph.tensors()[weight.name].values, weight.values)


def test_stop_between_data_and_model_keeps_the_old_pair(tmp_path, monkeypatch, capsys):
    model = load_model(EXAMPLE)
    out = tmp_path / "o.onnx"
    save_model(model, out, external_data=True)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    weight = next(t for t in model.graph.tensors().values() if hasattr(t, "values") and t.values.size > 1)
    old_values = weight.values.copy()
    weight.values = weight.values * 2
    real = os.replace

    def replace(a, b):  # the data file goes into place, then the writer dies before the model's rename
        if Path(b) == out:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, out, external_data=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    np.testing.assert_array_equal(load_model(out).graph.tensors()[weight.name].values, old_values)


# ---------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_during_a_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    real = onnx.save_model

    def save(proto, f, *args, **kwargs):
        if str(f).startswith(str(tmp_path)):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(proto, f, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        optimize("-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []  # no .nnopt-* folder, no staged report, no model
    assert signal.getsignal(signal.SIGTERM) == previous



def test_next_run_removes_temporaries_of_killed_runs(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its process id now names no running process
    (tmp_path / f".nnopt-{dead.pid}-abc").mkdir()
    (tmp_path / f".nnopt-{dead.pid}-abc" / "o.onnx").write_bytes(b"partial")
    (tmp_path / f".nnopt-{dead.pid}-def").write_text("partial report")
    live = f".nnopt-{os.getppid()}-ghi"  # a running writer's folder is left alone
    (tmp_path / live).mkdir()
    assert optimize("-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")) == 0
    assert sorted(os.listdir(tmp_path)) == [live, "o.onnx", "r.json"]
