"""Fetch policies' decisions, on trio's mock clock over in-memory blob sources."""

import pytest
import trio

from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.policies import FetchPolicy, FileMap, LayerInfo, PolicyError, PolicySet, load_policy, parse_policy_names
from lazyfs.fetch.policies.extent import ExtentPolicy
from lazyfs.fetch.policies.locality import LocalityPolicy
from lazyfs.fetch.scheduler import ChunkFetcher, Priority
from tests.t2_fetch import StreamingMemorySource, build_blob


@pytest.fixture
def cache(tmp_path):
    return ChunkCache(tmp_path / "cache")


def layer_of(source, refs, files=None, trace=()):
    return LayerInfo("layer", source, len(refs), lambda n: refs[n], trace_chunks=list(trace),
                     files=FileMap(files) if files is not None else None)


class Recorder(FetchPolicy):
    """A user's policy (loaded by name below): records what the fetcher tells it."""

    name = "recorder"

    def __init__(self):
        self.events = []

    def on_miss(self, ctx, layer, chunks):
        self.events.append(("miss", tuple(chunks)))

    def on_request_done(self, ctx, layer, chunks, priority):
        self.events.append(("done", tuple(chunks), priority))

    def on_idle(self, ctx):
        self.events.append(("idle",))


def test_locality_guesses_rest_of_file_then_blob_order_then_near_directory():
    blob, refs, _ = build_blob([1000] * 12, compress=False)
    files = [("/a/x", [0, 1, 2]), ("/b/y", [3, 4]), ("/a/z", [5]), ("/c/w", [6, 7, 8, 9, 10]), ("/a/far", [11])]
    layer = layer_of(StreamingMemorySource(blob), refs, files)
    policy = LocalityPolicy(window_bytes=2500, file_bytes=10_000, directory_bytes=10_000, reach_bytes=5500)
    # miss of chunk 0 (file /a/x): its rest, then 3 frames in blob order, then /a/z and /a/far
    # if stored within reach (5500 bytes: /a/z at 5000 yes, /a/far at 11000 no)
    assert policy.guesses(layer, [0]) == [1, 2, 3, 4, 5]
    assert policy.guesses(layer, [6]) == [7, 8, 9, 10, 11]
    bounded = LocalityPolicy(window_bytes=1500, file_bytes=1500, directory_bytes=0)
    assert bounded.guesses(layer, [0]) == [1, 2, 3, 4]  # 2 of the file, then 2 more in blob order
    no_map = layer_of(layer.source, refs)
    assert LocalityPolicy(window_bytes=2500).guesses(no_map, [4]) == [5, 6, 7]


async def test_locality_turns_a_chain_of_reads_into_few_requests(cache, autojump_clock):
    """Reading chunk N+1 only after chunk N: the first miss queues what follows at SPECULATIVE
    priority, fetched on the idle link; the later reads join it instead of asking again."""
    blob, refs, datas = build_blob([20_000] * 40)
    for names, most in ((["none"], 40), (["locality"], 4)):
        source = StreamingMemorySource(blob, name=f"blob {names}")
        fetcher = ChunkFetcher(ChunkCache(cache.root / names[0]))
        policies = PolicySet(fetcher, names)
        fetcher.policies = policies
        policies.attach(layer_of(source, refs, [(f"/pkg/f{i}", [i]) for i in range(40)]))
        async with fetcher:
            for ref, data in zip(refs, datas):
                assert await fetcher.get(source, [ref]) == [data]
                await trio.sleep(0.005)  # the reader works on the file before it opens the next
        assert len(source.requests) <= most, names
        if names == ["none"]:
            assert len(source.requests) == 40
        else:
            assert fetcher.stats.done[Priority.SPECULATIVE] > 30


def test_extent_window_doubles_while_misses_land_past_it_and_restarts_far_away():
    blob, refs, _ = build_blob([1000] * 40, compress=False)
    layer = layer_of(StreamingMemorySource(blob), refs, [(f"/p/f{i:02d}.pyc", [i]) for i in range(40)])
    policy = ExtentPolicy(min_window=2000, max_window=8000, grow_reach=3000, back=0.5)
    # A new region: 2000 bytes after the miss, 1000 before it (none before chunk 0).
    assert policy.guesses(layer, [0]) == [1, 2]
    # Past what was queued: twice the window, after and before (1 and 2 are pending by now;
    # the fetcher skips them).
    assert policy.guesses(layer, [3]) == [4, 5, 6, 7, 2, 1]
    assert policy.guesses(layer, [8]) == [*range(9, 17), 7, 6, 5, 4]
    assert policy.guesses(layer, [17]) == [*range(18, 26), *range(16, 12, -1)]  # at most max_window
    assert policy.state(layer).grown == 2
    # Beyond grow_reach of every region: a new one at the smallest window.
    assert policy.guesses(layer, [35]) == [36, 37, 34]
    # Another layer has regions of its own.
    other = layer_of(StreamingMemorySource(blob, name="other"), refs)
    assert policy.guesses(other, [3]) == [4, 5, 2]


def test_extent_guesses_the_rest_of_the_file_and_only_kinds_that_were_read():
    blob, refs, _ = build_blob([1000] * 10, compress=False)
    files = [("/p/a.pyc", [0]), ("/p/a.py", [1]), ("/p/b.pyc", [2]), ("/p/b.py", [3]), ("/p/libm.so.6", [4]),
             ("/p/c.pyc", [5]), ("/p/big.so", [6, 7, 8, 9])]
    layer = layer_of(StreamingMemorySource(blob), refs, files)
    policy = ExtentPolicy(min_window=6000, back=1.0)
    # Only .pyc files were read: the sources and libraries between them are left alone.
    assert policy.guesses(layer, [0]) == [2, 5]
    # A read of a library: the rest of it whatever its kind, then .pyc and .so files around it.
    assert policy.guesses(layer, [6]) == [7, 8, 9, 5, 4, 2, 0]
    assert ExtentPolicy(min_window=6000, by_kind=False).guesses(layer, [0]) == [1, 2, 3, 4, 5, 6]
    no_map = layer_of(layer.source, refs)  # before the file map is built: the window only
    assert ExtentPolicy(min_window=3000, back=0).guesses(no_map, [4]) == [5, 6, 7]


async def test_extent_turns_a_chain_of_reads_into_few_requests(cache, autojump_clock):
    """Reading chunk N+1 only after chunk N: the misses walk through the blob, so the window
    grows and the later reads find their chunks fetched or on their way."""
    blob, refs, datas = build_blob([20_000] * 80, compress=False)
    source = StreamingMemorySource(blob)
    fetcher = ChunkFetcher(cache)
    policies = PolicySet(fetcher, ["extent"])
    fetcher.policies = policies
    layer = layer_of(source, refs, [(f"/pkg{i // 10}/f{i}", [i]) for i in range(80)])
    policies.attach(layer)
    async with fetcher:
        for ref, data in zip(refs, datas):
            assert await fetcher.get(source, [ref]) == [data]
            await trio.sleep(0.005)
    # 7 when measured (without a policy: 80), the window grown 3 times
    assert len(source.requests) <= 12
    assert fetcher.stats.queued[Priority.SPECULATIVE] > 60
    assert policies.policies[0].state(layer).grown >= 2


async def test_trace_policy_prefetches_at_attach_and_none_does_nothing(cache, autojump_clock):
    blob, refs, datas = build_blob([1000] * 6)
    for names, expected in ((["none"], 0), (["trace"], 3)):
        source = StreamingMemorySource(blob, name=f"blob {names}")
        fetcher = ChunkFetcher(ChunkCache(cache.root / names[0]))
        policies = PolicySet(fetcher, names)
        fetcher.policies = policies
        async with fetcher:
            policies.attach(layer_of(source, refs, trace=[4, 0, 2]))
            await fetcher.wait_idle()
        assert fetcher.stats.queued[Priority.PREFETCH] == expected
        assert policies.readahead is False


async def test_a_users_policy_is_loaded_by_name_and_sees_every_event(cache, autojump_clock):
    blob, refs, datas = build_blob([1000] * 4)
    source = StreamingMemorySource(blob)
    fetcher = ChunkFetcher(cache)
    policies = PolicySet(fetcher, ["tests.t2_policies:Recorder", "readahead"])
    fetcher.policies = policies
    policies.attach(layer_of(source, refs))
    async with fetcher:
        assert await fetcher.get(source, refs[1:3]) == datas[1:3]
        await fetcher.wait_idle()
    recorder = policies.policies[0]
    assert recorder.events == [("miss", (1, 2)), ("done", (1, 2), Priority.ON_DEMAND), ("idle",)]
    assert policies.readahead is True


def test_policy_names_are_checked():
    assert parse_policy_names("trace, locality") == ["trace", "locality"]
    for bad in ("", "fast", ","):
        with pytest.raises(PolicyError):
            parse_policy_names(bad)
    with pytest.raises(PolicyError, match="cannot load"):
        load_policy("no_such_module_here:Policy")
    with pytest.raises(PolicyError, match="not a lazyfs"):
        load_policy("collections:OrderedDict")


async def test_detach_forgets_a_layer_but_not_another_on_the_same_blob(cache, autojump_clock):
    blob, refs, datas = build_blob([1000] * 4)
    source = StreamingMemorySource(blob)
    fetcher = ChunkFetcher(cache)
    policies = PolicySet(fetcher, ["tests.t2_policies:Recorder"])
    fetcher.policies = policies
    first, second = layer_of(source, refs), layer_of(source, refs)
    first.name, second.name = "first", "second"
    policies.attach(first)
    policies.attach(second)
    policies.detach("second")
    assert policies.ctx.layers[source.name] is first
    policies.detach("first")
    policies.detach("never attached")
    assert policies.ctx.layers == {}
    async with fetcher:
        assert await fetcher.get(source, refs[:1]) == datas[:1]
    assert [e[0] for e in policies.policies[0].events] == ["idle"]  # no layer: no miss reported
