"""ChunkGridDevice over a real ChunkFetcher and cache: adaptive readahead, correct bytes.

The blob source is the in-memory recording source of t2_fetch (requests on trio's mock clock).
"""

import trio

from lazyfs.serve.devices import ChunkGridDevice, RecentChunks
from lazyfs.fetch.scheduler import ChunkFetcher, Priority
from tests.t2_fetch import MemorySource, build_blob, cache  # noqa: F401 (fixture)

CELL = 4096
CELLS = 48
WINDOW_CELLS = 8


def _device(fetcher, source, refs):
    return ChunkGridDevice(fetcher, source, CELL, CELL * len(refs), refs.__getitem__,
                           recent=RecentChunks(budget=0), readahead_bytes=WINDOW_CELLS * CELL)


def _fetched_cells(source, refs) -> set[int]:
    by_offset = {ref.offset: n for n, ref in enumerate(refs)}
    cells = set()
    for offset, length in source.ranges():
        cells.update(n for o, n in by_offset.items() if offset <= o < offset + length)
    return cells


async def test_reading_the_head_fetches_only_the_head(cache, autojump_clock):
    blob, refs, datas = build_blob([CELL] * CELLS)
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        device = _device(fetcher, source, refs)
        head = b"".join([await device.read(0, CELL // 2), await device.read(CELL // 2, CELL // 2)])
        await fetcher.wait_idle()
    assert head == datas[0]
    assert _fetched_cells(source, refs) == {0}
    assert fetcher.stats.queued[Priority.READAHEAD] == 0


async def test_window_doubles_while_sequential_up_to_the_limit(cache, autojump_clock):
    blob, refs, datas = build_blob([CELL] * CELLS)
    source = MemorySource(blob)
    windows = []
    async with ChunkFetcher(cache) as fetcher:
        device = _device(fetcher, source, refs)
        for n in range(CELLS):
            for piece in range(2):  # the kernel reads a cell in pieces: the second adds nothing
                data = await device.read(n * CELL + piece * CELL // 2, CELL // 2)
                assert data == datas[n][piece * CELL // 2:(piece + 1) * CELL // 2]
            windows.append(device._window)
        await fetcher.wait_idle()
    assert windows[:6] == [0, 1, 2, 4, 4, 8]
    assert max(windows) == WINDOW_CELLS and windows[-1] == WINDOW_CELLS
    assert _fetched_cells(source, refs) == set(range(CELLS))
    assert fetcher.stats.chunks_fetched == CELLS  # every cell fetched once, most as readahead
    assert fetcher.stats.queued[Priority.READAHEAD] >= CELLS - 8


async def test_a_jump_resets_the_window(cache, autojump_clock):
    blob, refs, datas = build_blob([CELL] * CELLS)
    source = MemorySource(blob)
    async with ChunkFetcher(cache) as fetcher:
        device = _device(fetcher, source, refs)
        for n in range(6):
            await device.read(n * CELL, CELL)
        assert device._window >= 4
        await fetcher.wait_idle()
        before = set(_fetched_cells(source, refs))
        assert await device.read(30 * CELL, CELL) == datas[30]
        await fetcher.wait_idle()
        assert device._window == 0
        assert _fetched_cells(source, refs) - before == {30}
        assert await device.read(31 * CELL, 2 * CELL) == datas[31] + datas[32]  # continues: grows again
        await fetcher.wait_idle()
        assert device._window == 1
        assert _fetched_cells(source, refs) - before == {30, 31, 32, 33}
