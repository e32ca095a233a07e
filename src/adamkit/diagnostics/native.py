"""The Monitor's sampled step in C: built once with the system's C compiler, NumPy otherwise.

Three parts of a sampled step cost much more in torch and NumPy than the work they do
(``readout.c``, tested against them; none of them computes anything of the Adam update, which
stays in :mod:`adamkit.rule`):

- :class:`Percentiles`: ranking every sampled entry for the effective-lr percentiles of
  each tensor and of each scope (:func:`adamkit.diagnostics.signals.row_percentiles` and the
  weighted :func:`~adamkit.diagnostics.signals.percentiles`), bit for bit. In NumPy that
  takes about 30 calls (:class:`adamkit.diagnostics.ranking.RankedSample`: 0.45 ms for
  35 x 512 entries on the project's CPU, 0.75 ms right after a step has evicted the caches;
  in C 0.2-0.3 ms);
- :func:`row_sums`: the sums and counts of :func:`adamkit.diagnostics.signals.batch_sums`
  over the normalised updates and roots it computes with :mod:`adamkit.rule`, in one pass
  instead of about a dozen NumPy reductions, equal to NumPy's up to the order of additions;
- :class:`Gather`: copying the sampled runs of the moments into the float64 sample array,
  which in torch is a ``torch.cat`` of strided views per view shape, a conversion and a
  scatter (0.3 ms for m and v of 35 tensors after a step; in C one call, 0.2 ms: the runs
  touch 4,480 distinct pages, and the page walks are what is left).

The library is compiled on first use with ``$CC`` (else ``cc``, ``gcc`` or ``clang``), the
compiler adamkit's compiled executor needs anyway, into ``$ADAMKIT_CACHE_DIR`` (default
``~/.cache/adamkit``, else a temporary directory), named by a hash of the source, the
compiler and its flags, and loaded with ``ctypes``. Any failure (no compiler, a read-only
cache) leaves :func:`library` None for the rest of the process and the Monitor on NumPy.
``ADAMKIT_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adamkit.diagnostics.ranking import RankedSample

SOURCE = Path(__file__).with_name("readout.c")
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu99")
_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_TRIED = False


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    given = os.environ.get("ADAMKIT_CACHE_DIR")
    if given:
        return Path(given)
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "adamkit"


def _build(compiler: str, source: bytes) -> Path:
    tag = hashlib.sha256(source + compiler.encode() + " ".join(FLAGS).encode()).hexdigest()
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "adamkit"):
        target = folder / f"readout-{tag[:16]}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:
            continue  # an unwritable cache: the next folder
        os.close(fd)
        try:
            subprocess.run(
                [compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, target)  # atomic: a concurrent build writes the same file
            return target
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise OSError("no writable cache directory for adamkit's native readout")


def library() -> ctypes.CDLL | None:
    """The loaded library, built on the first call; None where it cannot be (see module)."""
    global _LIBRARY, _TRIED
    with _LOCK:
        if _TRIED:
            return _LIBRARY
        _TRIED = True
        if os.environ.get("ADAMKIT_NATIVE", "1") == "0":
            return None
        compiler = _compiler()
        if compiler is None:
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler, SOURCE.read_bytes())))
        except (OSError, subprocess.SubprocessError):
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.adamkit_percentiles_work_bytes.argtypes = [i64, i64, i64]
        lib.adamkit_percentiles_work_bytes.restype = i64
        lib.adamkit_percentiles.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr]
        lib.adamkit_percentiles.restype = None
        lib.adamkit_gather.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        lib.adamkit_gather.restype = None
        lib.adamkit_row_sums.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        lib.adamkit_row_sums.argtypes += [ctypes.c_double, ptr]
        lib.adamkit_row_sums.restype = None
        _LIBRARY = lib
        return lib


class Percentiles:
    """The per-row and weighted per-scope percentiles of a sample, in C where
    :func:`library` loads (with a scratch buffer kept between calls), else NumPy."""

    def __init__(self) -> None:
        self._work = np.empty(0, dtype=np.uint64)

    def __call__(
        self, eff: np.ndarray, w: np.ndarray, scopes: np.ndarray, q: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row percentiles [T, Q], NaN for a row without entries; scope percentiles
        [S, Q], NaN for a scope without entries) of ``eff`` ([T, K], NaN where an entry does
        not count), an entry of row ``i`` weighing ``w[i]`` in a scope, ``scopes`` [S, T]
        the rows of each scope."""
        lib = library()
        if lib is None or eff.size >= 2**32:
            return _numpy(eff, w, scopes, q)
        eff = np.ascontiguousarray(eff, dtype=np.float64)
        w = np.ascontiguousarray(w, dtype=np.float64)
        inside = np.ascontiguousarray(scopes, dtype=np.uint8)
        qs = np.ascontiguousarray(q, dtype=np.float64)
        T, K = eff.shape
        S, Q = inside.shape[0], len(qs)
        if w.shape != (T,) or inside.shape != (S, T):
            raise ValueError(
                f"Percentiles: eff of {T} rows needs w of shape ({T},) and scopes of shape "
                f"(S, {T}), got {w.shape} and {inside.shape}"
            )
        need = (lib.adamkit_percentiles_work_bytes(T, K, Q) + 7) // 8
        if self._work.size < need:
            self._work = np.empty(need, dtype=np.uint64)
        rows = np.empty((T, Q))
        out = np.empty((S, Q))
        lib.adamkit_percentiles(
            eff.ctypes.data, T, K, w.ctypes.data, inside.ctypes.data, S, qs.ctypes.data, Q,
            rows.ctypes.data, out.ctypes.data, self._work.ctypes.data,
        )  # fmt: skip
        return rows, out


DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
"""The element types :class:`Gather` reads, and their codes in ``readout.c``."""


class Gather:
    """Copies the samples of fixed tensors into a float64 array with one call: built for
    ``tensors`` (contiguous CPU tensors of :data:`DTYPES`), each sampled as ``runs`` runs of
    ``length`` entries ``stride`` apart, written end to end from ``dest`` in the array.
    :meth:`of` returns None where C is not at hand or a tensor does not qualify."""

    def __init__(self, lib: ctypes.CDLL, tensors: list[Tensor], table: np.ndarray) -> None:
        self._lib = lib
        self.tensors = tensors
        self._dtype = np.array([DTYPES[t.dtype] for t in tensors], dtype=np.int32)
        self._runs, self._length, self._stride, self._dest = (
            np.ascontiguousarray(column, dtype=np.int64) for column in table.T
        )
        self._ptr = np.zeros(len(tensors), dtype=np.uint64)
        self._end = int((self._dest + self._runs * self._length).max())
        for t, runs, length, stride in zip(tensors, self._runs, self._length, self._stride):
            if (runs - 1) * stride + length > t.numel() or min(runs, length, stride) < 0:
                raise ValueError(f"a sample of {runs} runs of {length} ({stride} apart) "
                                 f"reaches past a tensor of {t.numel()} entries")  # fmt: skip

    @classmethod
    def of(cls, tensors: list[Tensor], table: np.ndarray) -> Gather | None:
        """``table``: [len(tensors), 4] rows (runs, length, stride, dest)."""
        lib = library()
        if lib is None or not tensors:
            return None
        for t in tensors:
            if t.device.type != "cpu" or t.dtype not in DTYPES or not t.is_contiguous():
                return None
        return cls(lib, tensors, np.asarray(table, dtype=np.int64).reshape(len(tensors), 4))

    def __call__(self, out: np.ndarray) -> None:
        """Write the samples into ``out`` (float64, C-contiguous; its entries past the
        samples are left as they are)."""
        if out.dtype != np.float64 or not out.flags.c_contiguous or out.size < self._end:
            raise ValueError(
                f"Gather writes {self._end} entries into a C-contiguous float64 array, got "
                f"{out.dtype} of {out.size} entries"
            )
        self._ptr[:] = [t.data_ptr() for t in self.tensors]
        self._lib.adamkit_gather(
            len(self.tensors), self._ptr.ctypes.data, self._dtype.ctypes.data,
            self._runs.ctypes.data, self._length.ctypes.data, self._stride.ctypes.data,
            self._dest.ctypes.data, out.ctypes.data,
        )  # fmt: skip


def row_sums(
    u: np.ndarray,
    root: np.ndarray,
    v: np.ndarray,
    k: np.ndarray,
    w: np.ndarray,
    eps: np.ndarray,
    large: float,
) -> np.ndarray | None:
    """The reductions behind :func:`adamkit.diagnostics.signals.batch_sums` in C, or None
    where C is not at hand: for each row of the [T, K] arrays, over its first ``k`` entries,
    ``w`` times (sum u^2, sum v, #active, #active with root < eps, #active with |u| > large),
    [5, T], "active" meaning root > 0; zero for rows with ``w`` 0. ``u`` and ``root`` come from
    :mod:`adamkit.rule`: nothing of the update is computed here."""
    lib = library()
    if lib is None:
        return None
    T, K = u.shape
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (u, root, v, w, eps)]
    u, root, v, w, eps = arrays
    if root.shape != u.shape or v.shape != u.shape or w.shape != (T,) or eps.shape != (T,):
        raise ValueError(
            f"row_sums: u, root and v of one shape {u.shape} and w, eps of ({T},), got "
            f"{root.shape}, {v.shape}, {w.shape}, {eps.shape}"
        )
    k = np.ascontiguousarray(np.minimum(k, K), dtype=np.int64)
    out = np.zeros((5, T))
    lib.adamkit_row_sums(
        T, K, k.ctypes.data, w.ctypes.data, u.ctypes.data, root.ctypes.data, v.ctypes.data,
        eps.ctypes.data, float(large), out.ctypes.data,
    )  # fmt: skip
    return out


def _numpy(
    eff: np.ndarray, w: np.ndarray, scopes: np.ndarray, q: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    ranked = RankedSample(eff)
    out = np.array(
        [
            [np.nan if x is None else x for x in ranked.weighted_percentiles(w, inside, q)]
            for inside in np.asarray(scopes, dtype=bool)
        ]
    ).reshape(len(scopes), len(q))
    return ranked.row_percentiles(q), out
