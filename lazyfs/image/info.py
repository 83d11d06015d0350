"""What an image's layers are: for lazyfs layers, sizes, files, chunks and dedup, read by range."""

from __future__ import annotations

import stat

from lazyfs.layer import format as fmt
from lazyfs.layer.annotations import is_lazyfs
from lazyfs.layer.errors import LayerFormatError
from lazyfs.layer.reader import Layer, read_index
from lazyfs.registry.manifest import Manifest, Platform
from lazyfs.trace.format import Trace
from lazyfs.trace.prefetch import prefetch_chunks


async def open_layer(store, desc) -> tuple[Layer, object, bool] | None:
    """(layer, index, trusted footer) of a lazyfs layer descriptor, read by range; None for
    another kind of layer."""
    annotated = is_lazyfs(desc.annotations)
    tail = b""
    if not annotated:
        # Layers pushed without their annotations can still be lazyfs: look for a footer.
        if desc.size < fmt.FOOTER_FRAME_SIZE or not desc.media_type.endswith("+zstd"):
            return None
        tail = await store.read_range(desc.digest, desc.size - fmt.FOOTER_FRAME_SIZE, fmt.FOOTER_FRAME_SIZE)
        try:
            fmt.decode_footer(tail, desc.size)
        except LayerFormatError:
            return None
    index, trusted = read_index(lambda o, n: tail, desc.size, desc.annotations if annotated else None)
    meta = await store.read_range(desc.digest, index.meta.offset, index.meta.stored_size)
    table = await store.read_range(desc.digest, index.table.offset, index.table.stored_size)
    return Layer.load(index, meta, table, trusted_footer=trusted), index, trusted


async def layer_info(store, desc) -> dict:
    """A JSON-ready description of one layer descriptor of store."""
    info: dict = {"digest": desc.digest, "media_type": desc.media_type, "size": desc.size, "lazyfs": False}
    opened = await open_layer(store, desc)
    if opened is None:
        return info
    layer, index, trusted = opened
    try:
        files = sum(1 for _, inode in layer.image.walk() if stat.S_ISREG(inode.mode))
        entries = layer.table.entries
        frames = {(e.offset, e.stored_length): e.length for e in entries}
        chunk_bytes = sum(e.length for e in entries)
        info.update(
            lazyfs=True,
            format_version=index.version,
            index_from="footer (trusted)" if trusted else "annotations",
            chunk_size=index.chunk_size,
            chunks=len(entries),
            unique_chunks=len(frames),
            chunk_bytes=chunk_bytes,
            chunk_bytes_stored=sum(e.stored_length for e in entries),
            dedup_savings=chunk_bytes - sum(frames.values()),
            metadata_size=index.meta.size,
            metadata_stored=index.meta.stored_size,
            table_size=index.table.size,
            files=files,
            inodes=layer.image.inos,
            trace=index.trace is not None,
            layout="trace-ordered" if index.trace_ordered else "input",
            ordered_chunks=index.ordered_chunks,
        )
    finally:
        layer.close()
    return info


async def inspect_image(store, platform: Platform | None = None) -> dict:
    """Every image of store's reference (one platform of an index if platform is given)."""
    top = await store.get_manifest()
    manifests: list[tuple[Manifest, dict | None]] = []
    if top.is_index:
        for entry in top.manifests:
            if platform is not None and not (entry.platform and platform.matches(entry.platform)):
                continue
            manifests.append((await store.get_manifest(entry.digest), entry.platform))
    else:
        manifests.append((top, None))
    images = []
    for manifest, plat in manifests:
        layers = [await layer_info(store, desc) for desc in manifest.layers]
        images.append({"digest": manifest.digest, "media_type": manifest.media_type, "platform": plat,
                       "layers": layers})
    return {"reference": store.name, "digest": top.digest, "media_type": top.media_type, "images": images}


async def trace_cost(store, trace: Trace, platform: Platform | None = None) -> list[dict]:
    """What prefetching `trace` on the image costs, per lazyfs layer: the chunks, the file
    bytes they hold (uncompressed) and the stored bytes a prefetch fetches (distinct frames)."""
    manifest = await store.resolve_manifest(platform=platform)
    costs = []
    for desc in manifest.layers:
        opened = await open_layer(store, desc)
        if opened is None:
            continue
        layer = opened[0]
        try:
            # A trace recorded on this layer names chunks; one recorded before conversion, paths.
            chunks = prefetch_chunks(layer, desc.digest, trace, embedded=desc.digest not in trace.layers)
            refs = [layer.chunk_ref(n) for n in chunks]
        finally:
            layer.close()
        frames = {(r.offset, r.stored_length) for r in refs}
        costs.append({"digest": desc.digest, "chunks": len(chunks), "file_bytes": sum(r.length for r in refs),
                      "stored_bytes": sum(length for _, length in frames)})
    return costs
