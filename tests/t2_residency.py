"""MetadataTrimmer: an attached layer's metadata pages leave the RSS and come back intact."""

import os
from pathlib import Path

from lazyfs.erofs.reader import Image
from lazyfs.serve.layerfs import ROOT_INODE, LayerFS
from lazyfs.serve.residency import MetadataTrimmer, metadata_mapping
from tests.fixtures.erofs_trees import make_plain_image


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    target = os.path.realpath(path)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def _walk(fs: LayerFS, ino: int, out: dict) -> None:
    for entry in fs.listdir(ino):
        attr = fs.getattr(entry.ino)
        out[entry.ino] = attr
        if attr.mode & 0o170000 == 0o040000:
            _walk(fs, entry.ino, out)


def test_trim_unmaps_metadata_pages_and_reads_stay_correct(tmp_path):
    plain = make_plain_image(tmp_path)
    image = Image.open(plain.meta)
    try:
        fs = LayerFS()
        fs.attach("base", image, device=None)  # type: ignore[arg-type]  # metadata only
        assert metadata_mapping(fs.layer("base")) is not None
        before: dict = {}
        _walk(fs, ROOT_INODE, before)
        image._inode_cached.cache_clear()  # make the second walk read the mapping again
        assert _mapped_rss_kib(plain.meta) > 0
        trimmer = MetadataTrimmer(fs.layers)
        assert trimmer.trim() == 1
        assert _mapped_rss_kib(plain.meta) == 0
        after: dict = {}
        _walk(fs, ROOT_INODE, after)
        assert after == before
        assert _mapped_rss_kib(plain.meta) > 0
        image.close()  # e.g. a detach racing with the trimmer: skipped, no error
        assert trimmer.trim() == 0
    finally:
        image.close()
