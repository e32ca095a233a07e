"""Where monitor records go: JSON Lines, CSV, TensorBoard.

Every sink has ``write(record)`` and ``close()``. The file sinks write each record as one
complete line with a single ``os.write`` on an unbuffered file, so the file on disk always ends
at a record boundary unless the process dies inside that one system call; :func:`read_jsonl`
still tolerates (and reports) a truncated last line.

JSON Lines keep NaN and infinities as the tokens ``NaN``, ``Infinity``, ``-Infinity`` (what
Python's ``json``, pandas and jq read); ``None`` is ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor


def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")


def flatten(record: dict[str, Any], *, tensors: bool = False) -> dict[str, Any]:
    """One level of scalars: ``step``, ``loss``..., ``overall.<signal>``, ``group<g>.<signal>``,
    with ``tensors=True`` also ``tensor.<name>.<signal>``; ``alerts`` as names joined by ``;``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("overall", "groups", "tensors", "alerts"):
            continue
        out[key] = value
    for key, value in record.get("overall", {}).items():
        out[f"overall.{key}"] = value
    for g in record.get("groups", []):
        for key, value in g.items():
            if key != "group":
                out[f"group{g['group']}.{key}"] = value
    if tensors:
        for name, t in record.get("tensors", {}).items():
            for key, value in t.items():
                if key not in ("shape", "group"):
                    out[f"tensor.{name}.{key}"] = value
    out["alerts"] = ";".join(a["name"] for a in record.get("alerts", []))
    return out


class _LineFile:
    """An unbuffered file written one complete line per ``os.write`` (retrying short writes)."""

    def __init__(self, path: str | os.PathLike, append: bool, fsync: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        self._fsync = fsync

    def write_line(self, text: str) -> None:
        if self._fd is None:
            raise ValueError(f"write to a closed sink ({self.path})")
        data = (text.rstrip("\n") + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class JSONLSink:
    """Each record as one JSON line in ``path`` (truncated at open unless ``append``).

    ``fsync=True`` also asks the OS to put every line on disk (slower; survives a power cut).
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False, fsync: bool = False):
        self._file = _LineFile(path, append, fsync)
        self.path = self._file.path

    def write(self, record: dict[str, Any]) -> None:
        self._file.write_line(json.dumps(record, default=_jsonable, separators=(",", ":")))

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines file.

    A last line without its newline that does not parse (the writer died mid-line) is left
    out with a ``RuntimeWarning`` that says so; any other line that does not parse raises
    ``ValueError`` naming the line.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from e
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}: ignored a truncated last line ({len(tail)} bytes, line "
                f"{len(lines) + 1}); the writer probably stopped mid-record",
                RuntimeWarning,
                stacklevel=2,
            )
    return records


class CSVSink:
    """One CSV row per record (columns from :func:`flatten` of the first record).

    Columns are fixed by the first record; keys that appear only later are not written
    (``tensors=True`` adds per-tensor columns, which assume every tensor is present at the
    first sampled step). Missing values are empty cells.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tensors: bool = False,
        append: bool = False,
        fsync: bool = False,
    ):
        self._file = _LineFile(path, append, fsync)
        self.path = self._file.path
        self.tensors = tensors
        self.columns: list[str] | None = None

    @staticmethod
    def _row(values: list[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def write(self, record: dict[str, Any]) -> None:
        flat = flatten(record, tensors=self.tensors)
        if self.columns is None:
            self.columns = list(flat)
            self._file.write_line(self._row(self.columns))
        values = ["" if flat.get(c) is None else flat[c] for c in self.columns]
        self._file.write_line(self._row(values))

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars to a TensorBoard event file in ``log_dir``, flushed after every record.

    Tags: ``loss``, ``loss_mean``, ``loss_std``, ``overall/<signal>``, ``group<g>/<signal>``
    and, with ``tensors=True``, ``tensor/<name>/<signal>``; the x axis is the record's step.
    Needs the ``tensorboard`` package (``pip install adamkit[tensorboard]``).
    """

    def __init__(self, log_dir: str | os.PathLike, *, tensors: bool = False) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when tensorboard is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install tensorboard "
                "(or pip install 'adamkit[tensorboard]')"
            ) from e
        self.log_dir = str(log_dir)
        self.tensors = tensors
        self._writer = SummaryWriter(log_dir=self.log_dir)

    @staticmethod
    def tag(key: str) -> str:
        """``overall.grad_norm`` -> ``overall/grad_norm``; ``tensor.fc.weight.grad_norm`` ->
        ``tensor/fc.weight/grad_norm``."""
        if key.startswith("tensor."):
            name, signal = key[len("tensor.") :].rsplit(".", 1)
            return f"tensor/{name}/{signal}"
        return key.replace(".", "/", 1)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in flatten(record, tensors=self.tensors).items():
            if key in ("step", "time") or value is None or isinstance(value, (str, bool)):
                continue
            self._writer.add_scalar(self.tag(key), float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
