"""Snapshot files of the derived indexes: checksummed, written to a temporary file and renamed.

Layout: ``MAGIC``, a length-prefixed JSON header, the payload, then a trailer with the payload's
length and CRC-32. A reader gets either the whole snapshot that a writer completed or
`SnapshotError`, never a torn or bit-flipped one: the new file is fsynced before
``os.replace`` swaps it in, and the directory is fsynced after.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

MAGIC = b"TRAGSNP1"
_LENGTH = struct.Struct("<I")
_TRAILER = struct.Struct("<QI")
TMP_SUFFIX = ".tmp"
T = TypeVar("T")


class SnapshotError(Exception):
    """A snapshot file is missing, truncated, corrupt or of another format."""


class PayloadWriter:
    """The stream a payload is written to; it counts and checksums the bytes."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.size = 0
        self.crc = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` and return its length."""
        self._file.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return len(data)


class PayloadReader:
    """The stream a payload is read from: the payload's bytes only, checksummed as they are read."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self.remaining = size
        self.crc = 0

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that are left when ``n < 0``)."""
        data = self._file.read(self.remaining if n < 0 else min(n, self.remaining))
        self.remaining -= len(data)
        self.crc = zlib.crc32(data, self.crc)
        return data


def write_snapshot(path: Path, header: Mapping[str, Any], write_payload: Callable[[PayloadWriter], None]) -> None:
    """Atomically replace ``path`` with ``header`` and the payload that ``write_payload`` writes."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    encoded = json.dumps(header).encode()
    with tmp.open("wb") as file:
        file.write(MAGIC + _LENGTH.pack(len(encoded)) + encoded)
        writer = PayloadWriter(file)
        write_payload(writer)
        file.write(_TRAILER.pack(writer.size, writer.crc))
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_snapshot(path: Path, read_payload: Callable[[PayloadReader], T]) -> tuple[dict[str, Any], T]:
    """The header and the payload (as ``read_payload`` reads it) of ``path``.

    Raises `FileNotFoundError` if there is no file, `SnapshotError` if it is unusable.
    """
    try:
        with path.open("rb") as file:
            if file.read(len(MAGIC)) != MAGIC:
                raise SnapshotError(f"{path} is not a snapshot")
            (header_size,) = _LENGTH.unpack(file.read(_LENGTH.size))
            header = json.loads(file.read(header_size))
            payload_start = file.tell()
            file.seek(-_TRAILER.size, os.SEEK_END)
            size, crc = _TRAILER.unpack(file.read(_TRAILER.size))
            if payload_start + size + _TRAILER.size != file.tell():
                raise SnapshotError(f"{path} is truncated")
            file.seek(payload_start)
            reader = PayloadReader(file, size)
            payload = read_payload(reader)
    except (SnapshotError, FileNotFoundError):
        raise
    except Exception as error:  # any failure to parse means the file is unusable
        raise SnapshotError(f"{path} is unreadable: {error}") from error
    if reader.remaining or reader.crc != crc:
        raise SnapshotError(f"{path} fails its checksum")
    if not isinstance(header, dict):
        raise SnapshotError(f"{path} has no header")
    return header, payload


def snapshot_revision(path: Path, header: Mapping[str, Any]) -> int:
    """The store revision a snapshot reflects (``generation`` in snapshots written before the rename)."""
    revision = header.get("revision", header.get("generation"))
    if not isinstance(revision, int):
        raise SnapshotError(f"{path} does not say which store revision it reflects")
    return revision
