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


def test_extent_window_doubles_while_misses_walk_past_it_and_restarts_far_away():
    blob, refs, _ = build_blob([1000] * 40, compress=False)
    layer = layer_of(StreamingMemorySource(blob), refs, [(f"/p/f{i:02d}", [i]) for i in range(40)])
    policy = ExtentPolicy(min_window=2000, max_window=8000, grow_reach=3000, directory_bytes=0)
    assert policy.guesses(layer, [0]) == [1, 2]  # a new stretch: the smallest window
    assert policy.guesses(layer, [3]) == [4, 5, 6, 7]  # read on past it: twice the window
    assert policy.guesses(layer, [8]) == list(range(9, 17))
    assert policy.guesses(layer, [17]) == list(range(18, 26))  # at most max_window
    assert policy.guesses(layer, [35]) == [36, 37]  # beyond grow_reach: a new stretch
    assert policy.state(layer).grown == 3
    # Back in the first stretch, past its end again: it keeps its window.
    assert policy.guesses(layer, [26]) == list(range(27, 35))
    # Another layer has stretches of its own.
    other = layer_of(StreamingMemorySource(blob, name="other"), refs)
    assert policy.guesses(other, [3]) == [4, 5]


def test_extent_guesses_rest_of_file_then_window_then_directory_nearest_first():
    blob, refs, _ = build_blob([1000] * 16, compress=False)
    files = [("/a/x", [0, 1, 2]), ("/b/y", [3, 4]), ("/a/z", [5]), ("/c/w", [6, 7, 8, 9]), ("/a/far", [15]),
             ("/a/near", [11])]
    layer = layer_of(StreamingMemorySource(blob), refs, files)
    policy = ExtentPolicy(min_window=2000, file_bytes=10_000, directory_bytes=2000)
    # rest of /a/x, two frames after the miss (1 and 2 are taken: 3, 4), then the directory's
    # other files nearest first within 2000 bytes: /a/z, /a/near (not /a/far)
    assert policy.guesses(layer, [0]) == [1, 2, 3, 4, 5, 11]
    bounded = ExtentPolicy(min_window=1000, file_bytes=1000, directory_bytes=0)
    assert bounded.guesses(layer, [6]) == [7, 8]  # one chunk of the file, one more in blob order
    no_map = layer_of(layer.source, refs)
    assert ExtentPolicy(min_window=3000).guesses(no_map, [4]) == [5, 6, 7]


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
    # 8 when measured (without a policy: 80), the window grown 3 times
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
