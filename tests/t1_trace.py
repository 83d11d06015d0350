"""The trace format: round trips, record order, merge and stats, and refusal of bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.trace.format import Access, FileEvent, Trace, TraceError, TraceRecorder, merge

LAYER = "sha256:" + "a" * 64
paths = st.text(min_size=1, max_size=20).map(lambda s: "/" + s)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 500), st.integers(0, 100),
                          st.integers(0, 5), paths), max_size=20),
       st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["lookup", "open"]),
                          st.integers(0, 500), paths), max_size=20))
def test_round_trip(accesses, files):
    trace = Trace({LAYER: 65536},
                  sorted((Access(ms, LAYER, nid, first, first + extra, path)
                          for ms, nid, first, extra, path in accesses), key=lambda a: a.ms),
                  sorted((FileEvent(ms, kind, LAYER, nid, path) for ms, kind, nid, path in files),
                         key=lambda f: f.ms))
    assert Trace.decode(trace.encode()) == trace


def test_records_are_written_in_time_order_and_unknown_records_are_skipped():
    trace = Trace({LAYER: 4096}, [Access(5, LAYER, 1, 0, 0, "/b")], [FileEvent(2, "open", LAYER, 1, "/b")])
    lines = trace.encode().decode().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["lazyfs-trace", "layer", "open", "access"]
    again = Trace.decode(trace.encode() + b"future\t1\t2\n")
    assert again == trace


@pytest.mark.parametrize("data, message", [
    (b"lazyfs-trace\t2\n", "version 1"),
    (b"", "version 1"),
    (b"\xff\xfe", "UTF-8"),
    (b"lazyfs-trace\t1\nlayer\tx\t0\n", "line 2"),
    (b"lazyfs-trace\t1\naccess\t0\tx\t1\t5\t4\t/a\n", "line 2"),
    (b"lazyfs-trace\t1\nopen\t0\tx\t1\n", "line 2"),
    (b"lazyfs-trace\t1\nlookup\tzero\tx\t1\t/a\n", "line 2"),
])
def test_bad_traces_are_refused(data, message):
    with pytest.raises(TraceError, match=message):
        Trace.decode(data)


def test_recorder_extends_sequential_reads_and_records_files_once():
    recorder = TraceRecorder()
    recorder.record_file("lookup", LAYER, 4096, 7)
    recorder.record_file("open", LAYER, 4096, 7)
    recorder.record_file("open", LAYER, 4096, 7)
    recorder.record(LAYER, 4096, 7, "?", [0, 1])
    recorder.record(LAYER, 4096, 7, "?", [1, 2])
    recorder.record(LAYER, 4096, 8, "?", [3])
    recorder.record_file("open", "plain:x", 0, 1)
    trace = recorder.trace
    assert [(a.nid, a.first, a.last) for a in trace.accesses] == [(7, 0, 2), (8, 3, 3)]
    assert [(f.kind, f.layer) for f in trace.files] == [("lookup", LAYER), ("open", LAYER), ("open", "plain:x")]
    assert trace.layers == {LAYER: 4096}
    assert Trace.decode(trace.encode()) == trace


def test_stats_and_merge_conflicts():
    trace = Trace({LAYER: 1000}, [Access(0, LAYER, 1, 0, 2, "/a"), Access(7, LAYER, 2, 2, 3, "/b")],
                  [FileEvent(9, "open", LAYER, 3, "/c")])
    stats = trace.stats()
    assert (stats.files, stats.files_read, stats.chunks, stats.bytes, stats.span_ms) == (3, 2, 4, 4000, 9)
    assert trace.paths() == {"/a", "/b", "/c"}
    with pytest.raises(TraceError, match="chunk size"):
        merge([trace, Trace({LAYER: 2000})])
    assert merge([trace]).stats() == stats


# -- untrusted traces (from a registry) and the size cap ---------------------------------------

OTHER = "sha256:" + "b" * 64


def _good() -> Trace:
    return Trace({LAYER: 65536}, [Access(1, LAYER, 3, 0, 4, "/a"), Access(2, LAYER, 4, 9, 9, "/b")],
                 [FileEvent(0, "open", LAYER, 3, "/a")])


def test_untrusted_trace_accepted_when_it_names_only_the_image_layers():
    from lazyfs.trace.format import decode_untrusted
    assert decode_untrusted(_good().encode(), [LAYER, OTHER]) == _good()


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.layers.update({OTHER: 65536}), "not a layer of the image"),
    (lambda t: t.accesses.append(Access(3, OTHER, 1, 0, 0, "/x")), "not a layer of the image"),
    (lambda t: t.files.append(FileEvent(3, "open", "plain:x", 1, "/x")), "not a layer digest"),
    (lambda t: t.layers.update({LAYER: 65535}), "chunk size"),
    (lambda t: t.layers.update({LAYER: 128 << 20}), "chunk size"),
    (lambda t: t.accesses.append(Access(-1, LAYER, 1, 0, 0, "/x")), "negative"),
    (lambda t: t.accesses.append(Access(1, LAYER, -1, 0, 0, "/x")), "negative"),
    (lambda t: t.accesses.append(Access(1, LAYER, 1, 0, 0, "/" + "x" * 5000)), "long path"),
    (lambda t: t.accesses.append(Access(1, LAYER, 1, 0, 2_000_000, "/x")), "more than"),
])
def test_untrusted_trace_refused(mutate, message):
    from lazyfs.trace.format import decode_untrusted
    trace = _good()
    mutate(trace)
    with pytest.raises(TraceError, match=message):
        decode_untrusted(trace.encode(), [LAYER])


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "UTF-8"), (b"lazyfs-trace\t2\n", "version 1"), (b"lazyfs-trace\t1\naccess\t1\n", "line 2"),
    (b"lazyfs-trace\t1\n" + b"\n" * 200_001, "records"), (b"x" * (8 << 20) + b"y", "limit"),
])
def test_untrusted_garbage_refused(data, message):
    from lazyfs.trace.format import decode_untrusted
    with pytest.raises(TraceError, match=message):
        decode_untrusted(data, [LAYER])


@given(st.integers(60, 2000))
def test_cap_keeps_the_earliest_records_within_the_size(limit):
    from lazyfs.trace.format import cap
    trace = Trace({LAYER: 65536}, [Access(ms, LAYER, ms, ms, ms, f"/f{ms}") for ms in range(50)],
                  [FileEvent(ms, "open", LAYER, ms, f"/f{ms}") for ms in range(0, 50, 3)])
    capped = cap(trace, limit)
    assert len(capped.encode()) <= max(limit, len(Trace({LAYER: 65536}).encode()))
    kept = [a.ms for a in capped.accesses]
    assert kept == list(range(len(kept)))  # a prefix in time order
    assert cap(trace, 10**6) == trace
