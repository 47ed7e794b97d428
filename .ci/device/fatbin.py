"""Keep one GPU architecture's cubins in a shared library's CUDA fat binaries.

Transformer Engine's core wheel (transformer-engine-cu13) carries
libtransformer_engine.so with cubins for eight architectures (sm_75 .. sm_120):
276 MB compressed, over the 64 MiB a command may carry to the lent GPU machine.
Every fat binary in it holds an sm_90 cubin, which is all an H100/H200 loads.
`strip_fatbins` rewrites each fat binary in place to hold only the cubins of the
architectures kept (its header's size shrunk, the entries kept moved to its
start, the bytes freed zeroed), so the file keeps its size and every offset the
ELF and the fat-binary wrappers point at, and the zeros compress away.

Layout (as CUDA writes it; the same one cuobjdump reads): a fat binary is a
16-byte header (magic 0xBA55ED50, version 1, header size 16, u64 size of the
entries that follow), then entries, each a header (u16 kind: 1 PTX, 2 cubin;
u16 version; u32 header size; u64 padded payload size; ...; u32 sm arch at
byte 28) and its payload.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass

MAGIC = 0xBA55ED50
_HEADER = struct.Struct("<IHHQ")
_ENTRY_MIN = 32  # an entry header holds at least the fields up to its arch (bytes 28..32)


@dataclass(frozen=True)
class Entry:
    offset: int  # of the entry header, in the file
    size: int  # header + padded payload
    kind: int
    arch: int


def fat_binaries(data: bytes | bytearray) -> list[tuple[int, int, list[Entry]]]:
    """Every fat binary in `data`: (offset, size of its entries, entries)."""
    found = []
    magic = struct.pack("<I", MAGIC)
    pos = 0
    while (start := data.find(magic, pos)) >= 0:
        _, version, header_size, size = _HEADER.unpack_from(data, start)
        if version != 1 or header_size != _HEADER.size or start + header_size + size > len(data):
            pos = start + 4
            continue
        entries, at, end = [], start + header_size, start + header_size + size
        while at + _ENTRY_MIN <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, at)
            if entry_header < _ENTRY_MIN or at + entry_header + payload > end:
                break  # not an entry: the magic matched by chance
            arch = struct.unpack_from("<I", data, at + 28)[0]
            entries.append(Entry(at, entry_header + payload, kind, arch))
            at += entry_header + payload
        if at != end or not entries:
            pos = start + 4
            continue
        found.append((start, size, entries))
        pos = end
    return found


def arch_sizes(data: bytes | bytearray) -> Counter:
    """Bytes of cubin/PTX entries per (kind, arch)."""
    sizes = Counter()
    for _, _, entries in fat_binaries(data):
        for e in entries:
            sizes[(e.kind, e.arch)] += e.size
    return sizes


def strip_fatbins(data: bytearray, keep_archs: set[int]) -> int:
    """Drop every entry whose arch is not in `keep_archs`, in place; returns the bytes freed.

    Raises ValueError, `data` unchanged, when a fat binary holds none of the kept
    architectures (the loader would see an empty fat binary there)."""
    binaries = fat_binaries(data)
    for start, _, entries in binaries:  # check all before changing any
        if not any(e.arch in keep_archs for e in entries):
            raise ValueError(f"the fat binary at offset {start} has no entry for sm {sorted(keep_archs)} "
                             f"(only {sorted({e.arch for e in entries})})")
    freed = 0
    for start, size, entries in binaries:
        kept = [e for e in entries if e.arch in keep_archs]
        body = b"".join(bytes(data[e.offset : e.offset + e.size]) for e in kept)
        first = start + _HEADER.size
        data[first : first + len(body)] = body
        data[first + len(body) : first + size] = bytes(size - len(body))
        struct.pack_into("<Q", data, start + 8, len(body))
        freed += size - len(body)
    return freed
