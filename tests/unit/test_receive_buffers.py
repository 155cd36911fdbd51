"""Which buffer the runtime reads the next datagram into (``RuntimeCore._receive_buffer``).

A buffer a large datagram was decoded in is shrunk to it and held while a payload views it (a
frame out of order, a partial message). The next datagram goes into the current buffer if it is
free again, else into the spare one used last: the buffers most recently touched are in the
CPU's caches. Going round every buffer ever made, as a ring did, left each datagram landing in
memory out of cache for good once a loss had made the set grow.
"""

from __future__ import annotations

from glue.runtime import _RECV_BYTES, RuntimeCore
from glue.settings import load_settings


def _decoded(buffer: bytearray, size: int = 60_000) -> memoryview:
    """What ``_read`` does with a large datagram: shrink the buffer to it, decode views of it."""
    del buffer[size:]
    return memoryview(buffer)[100:size]


def _core() -> RuntimeCore:
    return RuntimeCore(load_settings())


def test_a_free_current_buffer_is_read_into_again() -> None:
    core = _core()
    first = core._receive_buffer()
    for _ in range(10):
        view = _decoded(first)
        view.release()  # delivered in order: nothing keeps it
        assert core._receive_buffer() is first
        assert len(first) == _RECV_BYTES
    assert core.counters["receive_buffers_allocated"] == 0


def test_after_a_burst_of_held_buffers_one_hot_buffer_is_used_again_not_all_in_turn() -> None:
    core = _core()
    held: list[memoryview] = []
    made = []
    for _ in range(50):  # frames out of order behind a loss: each holds its buffer
        buffer = core._receive_buffer()
        made.append(buffer)
        held.append(_decoded(buffer))
    assert len({id(b) for b in made}) == 50
    assert core.counters["receive_buffers_allocated"] == 49
    for view in held:  # the hole is repaired: every frame delivered, every view released
        view.release()
    used = set()
    for _ in range(200):  # a lossless stream again
        buffer = core._receive_buffer()
        used.add(id(buffer))
        _decoded(buffer).release()
    assert len(used) <= 2, len(used)  # not 50 in turn
    assert core.counters["receive_buffers_allocated"] == 49  # and none made


def test_a_held_buffer_is_never_read_into_and_freed_ones_are_found_again() -> None:
    core = _core()
    views = {}
    for _ in range(20):
        buffer = core._receive_buffer()
        assert id(buffer) not in views  # never one a live payload still views
        views[id(buffer)] = _decoded(buffer)
    for key in list(views)[:10]:  # the oldest ten delivered
        views.pop(key).release()
    for _ in range(30):
        buffer = core._receive_buffer()
        assert id(buffer) not in views
        views[id(buffer)] = _decoded(buffer)
        if len(views) > 20:
            views.pop(next(iter(views))).release()
    # 20 held at most at any time: the freed ones were found, not 40 new ones made.
    assert core.counters["receive_buffers_allocated"] <= 24
