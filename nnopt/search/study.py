"""The --study folder: every candidate evaluated, kept as it completes, so that a run resumes without re-evaluating."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from nnopt.atomic import write_atomic
from nnopt.errors import InputError, OutputError, first_line
from nnopt.search.candidate import CandidateResult, Configuration, config_key

log = logging.getLogger(__name__)

#: The files of a study folder: its fingerprint, one JSON line per candidate, the models of the Pareto front.
STUDY_FILE = "study.json"
CANDIDATES_FILE = "candidates.jsonl"
MODELS_FOLDER = "models"
#: The layout's version, stored in study.json: a folder of another layout is refused, never misread.
FORMAT = 1

_KEY = re.compile(r"[0-9a-f]{16}")


class Study:
    """The candidates of one search (model, data, metric, seed, options), by configuration key.

    On disk (``folder`` given): ``study.json`` holds the fingerprint, ``candidates.jsonl`` one record per
    result, appended and synced to disk as each completes (a run killed at any point loses at most the record
    being written), ``models/<key>.onnx`` the models kept. ``folder=None``: the same in memory, for a run
    without ``--study``. One run at a time per folder: two runs appending to one folder are not guarded
    against.

    Args:
        folder: the study folder (created when missing; an existing one must hold a study or nothing).
        fingerprint: what makes results comparable (e.g. model and data hashes, metric, drop type, seed,
            level, options that change what a configuration evaluates to): JSON values, compared after a JSON
            round trip.

    Raises:
        InputError: ``folder`` holds the study of another fingerprint (naming what differs), or is not a study
            folder; nothing is written then.
        OutputError: the folder cannot be created or written.
    """

    def __init__(self, folder: str | os.PathLike[str] | None, fingerprint: Mapping[str, Any]) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.fingerprint: dict[str, Any] = json.loads(json.dumps(dict(fingerprint), sort_keys=True, allow_nan=False))
        self._results: dict[str, CandidateResult] = {}
        self._models: dict[str, bytes] = {}  # in memory only
        #: Candidates evaluated through ``cached`` by this process (not answered from the study).
        self.evaluations = 0
        if self.folder is not None:
            self._open_folder(self.folder)

    @classmethod
    def open(cls, folder: str | os.PathLike[str] | None, fingerprint: Mapping[str, Any]) -> Study:
        """Open (or create) the study in ``folder``; None: a study in memory. See the class."""
        return cls(folder, fingerprint)

    # ------------------------------------------------------------------------------------------- candidates

    def get(self, key: str) -> CandidateResult | None:
        """The result stored for a configuration key, or None."""
        return self._results.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._results

    def __len__(self) -> int:
        return len(self._results)

    def results(self) -> list[CandidateResult]:
        """Every result, in the order their keys were first added (a key added again holds its newest result)."""
        return list(self._results.values())

    def add(self, result: CandidateResult) -> None:
        """Keep ``result`` (failed ones too); on disk, appended and synced before this returns.

        Adding a key again replaces its result (e.g. with its measured latency): the newest record wins.
        """
        if self.folder is not None:
            line = json.dumps(result.to_dict(), sort_keys=True, separators=(",", ":"), default=_plain) + "\n"
            path = self.folder / CANDIDATES_FILE
            try:
                with path.open("a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise OutputError(f"{path}: cannot write: {exc.strerror or first_line(exc)}") from exc
        self._results[result.key] = result

    def cached(self, evaluate_batch: Callable[[list[Configuration]], list[CandidateResult]]
               ) -> Callable[[list[Configuration]], list[CandidateResult]]:
        """``evaluate_batch`` behind the study: what it holds is answered from it, the rest evaluated and added.

        The configurations not held are evaluated in one call (each key once), so a batch keeps its parallelism;
        their results are added when the call returns (a run killed during a batch loses that batch only).
        Results come back in the order of the configurations.
        """

        def evaluate(configs: list[Configuration]) -> list[CandidateResult]:
            keys = [config_key(config) for config in configs]
            missing = {key: config for key, config in zip(keys, configs) if key not in self._results}
            if missing:
                results = evaluate_batch(list(missing.values()))
                if [r.key for r in results] != list(missing):
                    raise ValueError("evaluate_batch returned results of other configurations, or in another order")
                for result in results:
                    self.add(result)
                self.evaluations += len(results)
            return [self._results[key] for key in keys]

        return evaluate

    # ----------------------------------------------------------------------------------------------- models

    def save_model(self, key: str, data: bytes) -> Path | None:
        """Keep the serialised model of candidate ``key``: ``models/<key>.onnx``, written atomically.

        Returns:
            The model's path; None for a study in memory (the bytes are kept, see ``model_bytes``).
        """
        _check_key(key)
        if self.folder is None:
            self._models[key] = bytes(data)
            return None
        path = self.folder / MODELS_FOLDER / f"{key}.onnx"
        write_atomic(path, data, sync=True)
        return path

    def model_path(self, key: str) -> Path | None:
        """The path of candidate ``key``'s kept model, or None (none kept, or a study in memory)."""
        _check_key(key)
        if self.folder is None:
            return None
        path = self.folder / MODELS_FOLDER / f"{key}.onnx"
        return path if path.is_file() else None

    def model_bytes(self, key: str) -> bytes | None:
        """The serialised model kept for candidate ``key``, or None."""
        path = self.model_path(key)
        return path.read_bytes() if path is not None else self._models.get(key)

    def remove_models(self, keep: Iterable[str]) -> None:
        """Delete the kept models of every candidate but ``keep`` (e.g. those no longer on the Pareto front)."""
        keep = set(keep)
        if self.folder is None:
            self._models = {k: v for k, v in self._models.items() if k in keep}
            return
        folder = self.folder / MODELS_FOLDER
        for path in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
            if _KEY.fullmatch(path.stem) and path.stem not in keep:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ disk

    def _open_folder(self, folder: Path) -> None:
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--study {folder}: is not a folder")
        record = folder / STUDY_FILE
        if record.exists():
            self._check_fingerprint(folder, record)
            self._load(folder / CANDIDATES_FILE)
            return
        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"--study {folder}: holds no {STUDY_FILE} and is not empty; give a new or empty folder")
        text = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint}, indent=2, sort_keys=True) + "\n"
        write_atomic(record, text.encode(), sync=True)

    def _check_fingerprint(self, folder: Path, record: Path) -> None:
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
            fingerprint = stored["fingerprint"]
            layout = stored["format"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"--study {folder}: {STUDY_FILE} is unreadable ({first_line(exc)})") from None
        if layout != FORMAT:
            raise InputError(f"--study {folder}: a study of layout {layout}; this nnopt reads layout {FORMAT}")
        if fingerprint != self.fingerprint:
            difference = fingerprint_difference(fingerprint, self.fingerprint)
            raise InputError(f"--study {folder}: a study of another run ({difference}); give another folder")

    def _load(self, path: Path) -> None:
        """Read the records; a torn last line (a run killed while appending) is dropped from the file."""
        try:
            data = path.read_bytes() if path.exists() else b""
        except OSError as exc:
            raise InputError(f"--study {path}: cannot read: {exc.strerror or first_line(exc)}") from None
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: ignoring its last line, cut short (a run stopped while writing it)", path)
            try:
                with path.open("r+b") as f:
                    f.truncate(complete)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write: {exc.strerror or first_line(exc)}") from exc
        for number, line in enumerate(data[:complete].decode("utf-8", errors="replace").splitlines(), 1):
            try:
                result = CandidateResult.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                log.warning("%s:%d: ignoring a record that is not a candidate (%s)", path, number, first_line(exc))
                continue
            self._results[result.key] = result


def fingerprint_difference(stored: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """What differs between two fingerprints, e.g. ``seed 1 here, 0 in the study; metric 'top1' here, ...``."""
    parts = []
    for name in sorted(set(stored) | set(given)):
        if stored.get(name, _MISSING) != given.get(name, _MISSING):
            here, there = _show(given.get(name, _MISSING)), _show(stored.get(name, _MISSING))
            parts.append(f"{name} {here} here, {there} in the study")
    return "; ".join(parts)


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(none)"
    # Long values (hashes) cut: which field differs matters, not all 64 hex digits.
    text = repr(value) if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:20] + "..."


def _check_key(key: str) -> None:
    # A key names a file: only config_key's 16 hex digits, never a path.
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a configuration key (16 hex digits)")


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays in a result's ``extra``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
