"""The wrapper pass that keeps a signals kernel's scratch buffers between calls
(adamkit.execution.scratch), on wrapper text shaped as inductor writes it; the compiled
kernels with and without it are compared in test_compiled.py."""

from __future__ import annotations

import threading

import torch

from adamkit.execution import scratch
from adamkit.execution.scratch import Scratch, keep_scratch

WRAPPER = """\
import torch
empty_strided_cpu = torch._C._dynamo.guards._empty_strided_cpu
reinterpret_tensor = torch._C._dynamo.guards._reinterpret_tensor
CALLS = []


def kernel(*buffers):
    CALLS.append(buffers)
    out, rows, table = buffers[0], buffers[1], buffers[2]
    rows.fill_(1.0)
    table.copy_(torch.arange(5.0))
    out.copy_(rows.sum() + table)


class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def call(self, args):
        arg0_1, arg1_1 = args
        args.clear()
        s22 = arg1_1
        buf0 = empty_strided_cpu((s22, ), (1, ), torch.float32)
        buf1 = empty_strided_cpu((5, ), (1, ), torch.float32)
        buf2 = reinterpret_tensor(buf1, (1, ), (1, ), 0)  # alias
        buf3 = empty_strided_cpu((s22, 256), (256, 1), torch.uint8)
        buf9 = empty_strided_cpu((5, ), (1, ), torch.float32)
        buf8 = reinterpret_tensor(buf9, (1, ), (1, ), 0)  # alias
        buf4 = empty_strided_cpu((5, ), (1, ), torch.float32)
        buf6 = empty_strided_cpu((s22, 5), (5, 1), torch.float32)
        kernel(buf4, buf0, buf1, buf2, buf3, buf8)
        del arg0_1
        buf5 = buf9; del buf9  # reuse
        return (reinterpret_tensor(buf4, (1, 5), (5, 1), 0), buf5, )
runner = Runner(partitions=[])
call = runner.call
"""


def _load(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<wrapper>", "exec"), namespace)
    return namespace


def test_only_the_small_scratch_buffers_and_their_views_are_kept() -> None:
    """buf0 (1-d), buf1 and its alias buf2, buf6 (rows of 5: a table of row sums) are made
    once; buf3 (rows of 256: a row of codes, as big as the params) is made per call, as are
    the outputs: buf4 (returned through a view) and buf9 (returned as its reuse buf5) with its
    alias buf8. The line count is unchanged up to the appended maker, so inductor's line map
    stays right."""
    out = keep_scratch(WRAPPER)
    assert out != WRAPPER
    body = out.split("\n")[: len(WRAPPER.split("\n"))]
    (kept,) = [line for line in body if ".get(_adamkit_scratch_make_" in line]
    assert kept.strip().startswith("buf0, buf1, buf2, buf6, = _adamkit_scratch_cache_0.get(")
    assert kept.rstrip().endswith("(s22,))")
    for name in ("buf3", "buf4", "buf9", "buf8"):
        assert any(line.strip().startswith(f"{name} = ") for line in body), name
    ns = _load(out)
    first = ns["call"]([torch.zeros(3), 3])
    second = ns["call"]([torch.zeros(3), 3])
    calls = ns["CALLS"]
    assert calls[0][1] is calls[1][1] and calls[0][2] is calls[1][2]  # buf0, buf1 kept
    assert calls[0][3].data_ptr() == calls[1][3].data_ptr() == calls[0][2].data_ptr()
    assert calls[0][0] is not calls[1][0] and calls[0][4] is not calls[1][4]  # out, codes
    assert first[0] is not second[0] and first[1] is not second[1]
    assert torch.equal(first[0], torch.tensor([[3.0, 4.0, 5.0, 6.0, 7.0]]))
    ns["call"]([torch.zeros(4), 4])  # other sizes: other buffers
    assert calls[2][1] is not calls[0][1] and calls[2][1].shape == (4,)


def test_wrappers_it_does_not_understand_are_left_alone() -> None:
    """No call, two returns, or a kept line that names something other than sizes defined
    above it: the source comes back unchanged. Nothing to keep: unchanged too."""
    assert keep_scratch("x = 1\n") == "x = 1\n"
    twice = WRAPPER.replace("        del arg0_1\n", "        return (buf4, )\n")
    assert keep_scratch(twice) == twice
    late = WRAPPER.replace("(s22, ), (1, ), torch.float32)", "(s23, ), (1, ), torch.float32)")
    assert keep_scratch(late) == late
    none = WRAPPER.replace("buf4, buf0, buf1, buf2, buf3, buf8", "buf4")
    none = none.replace("return (reinterpret_tensor(buf4, (1, 5), (5, 1), 0), buf5, )",
                        "return (buf0, buf1, buf4, buf5, buf6, )")  # fmt: skip
    assert keep_scratch(none) == none


def test_scratch_keeps_buffers_per_thread_and_per_size(monkeypatch) -> None:
    """Same thread and sizes: the same buffers; another thread: its own; more than KEEP_SIZES
    sizes, or more than MAX_BYTES in all: the oldest dropped; one call above MAX_BYTES: never
    kept."""
    made = []

    def make(n):
        made.append(n)
        return (torch.empty(n), torch.empty(2))

    cache = Scratch()
    a = cache.get(make, (8,))
    assert cache.get(make, (8,)) is a and made == [8]
    other = []
    thread = threading.Thread(target=lambda: other.append(cache.get(make, (8,))))
    thread.start()
    thread.join()
    assert other[0] is not a and made == [8, 8]
    for n in range(9, 9 + scratch.KEEP_SIZES):
        cache.get(make, (n,))
    assert len(cache.kept) == scratch.KEEP_SIZES
    assert cache.bytes == sum(4 * (key[1] + 2) for key in cache.kept)
    assert cache.get(make, (8,)) is not a  # evicted, made again
    monkeypatch.setattr(scratch, "MAX_BYTES", 4 * 1002 + 4 * 102)
    small = Scratch()
    first = small.get(make, (100,))
    big = small.get(make, (1000,))  # fits beside the first
    assert small.get(make, (100,)) is first and small.get(make, (1000,)) is big
    small.get(make, (500,))  # the oldest sizes go until it fits
    assert [key[1:] for key in small.kept] == [(500,)] and small.bytes == 4 * 502
    huge = small.get(make, (5000,))
    assert small.get(make, (5000,)) is not huge and [k[1:] for k in small.kept] == [(500,)]


def test_a_buffer_returned_through_any_expression_is_not_kept() -> None:
    """A name made of a buffer in any way (a slice here, not an inductor alias) that is
    returned takes the buffer out of the kept ones, and its aliases with it."""
    sliced = WRAPPER.replace(
        "        buf5 = buf9; del buf9  # reuse\n",
        "        buf5 = buf9; del buf9  # reuse\n        buf7 = buf1[1:3]\n",
    ).replace("buf5, )", "buf5, buf7, )")
    out = keep_scratch(sliced)
    (kept,) = [line for line in out.split("\n") if ".get(_adamkit_scratch_make_" in line]
    assert kept.strip().startswith("buf0, buf6, = _adamkit_scratch_cache_0.get(")
    ns = _load(out)
    first = ns["call"]([torch.zeros(3), 3])
    second = ns["call"]([torch.zeros(3), 3])
    assert first[2].data_ptr() != second[2].data_ptr()  # buf1 fresh on every call
    assert ns["CALLS"][0][1] is ns["CALLS"][1][1]  # buf0 kept
