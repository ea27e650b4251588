"""Snapshot files: the whole daemon state in one safetensors file, checksummed, written atomically.

A snapshot is `snapshot-<segment>.safetensors` in the state directory, where <segment> is the first WAL
segment it does not contain (daemon/wal.py): restore = this file + replay of segments >= <segment>.
Tensor names are grouped by part, `<part>.<name>`: `model.*` (serving weights, torch.nn.LSTM + head names),
`state.*` (the state store's resident streams, see StateStore.snapshot_tensors), `engine.*` (per-stream task
state), `versions.*` (the model history), and `recorder.*` / `trainer.*` when training is on. Each part names its
own tensors without a prefix; `join` adds `<part>.` when a snapshot is written and `split` strips it when one is
read, so a part never needs to know the name it is stored under. Metadata (strings) holds the format, the model
spec and version, the WAL segment, and `checksum`: the crc32 (zlib) of the header with the checksum left out
(canonical JSON) followed by the whole data section, so a flipped bit anywhere in a name, shape, offset,
metadata value or tensor byte is detected. Never pickle.

Writing is atomic: temporary file in the same directory, fsync, rename over the final name, fsync of the
directory. A crash leaves either the complete new file or none (a stale `.tmp` is removed at the next start).
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from lstmd.daemon.wal import fsync_dir

FORMAT = "lstmd-snapshot-1"
_NAME = re.compile(r"^snapshot-(\d{12})\.safetensors$")


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (torn, corrupt, or from another format); the message says why."""


@dataclass
class Snapshot:
    path: Path
    segment: int  # first WAL segment not contained
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def join(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One flat dict of a snapshot's tensors: each part's own names under `<part>.`."""
    for part in parts:
        if not part or "." in part:
            raise ValueError(f"snapshot part name {part!r}: must be non-empty and without a dot")
    return {f"{part}.{name}": tensor for part, tensors in parts.items() for name, tensor in tensors.items()}


def split(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a snapshot's tensors, `<part>.` stripped from their names (the inverse of `join`)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        part, _, rest = name.partition(".")
        parts.setdefault(part, {})[rest] = tensor
    return parts


def snapshot_path(directory: Path, segment: int) -> Path:
    return directory / f"snapshot-{segment:012d}.safetensors"


def list_snapshots(directory: Path) -> list[int]:
    """Segment numbers of the snapshot files in `directory`, ascending."""
    if not directory.is_dir():
        return []
    found = (_NAME.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _checksum(header: dict, data: memoryview) -> str:
    header = dict(header)
    meta = dict(header.get("__metadata__") or {})
    meta.pop("checksum", None)
    header["__metadata__"] = meta
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return f"{zlib.crc32(data, zlib.crc32(canonical)):08x}"


def _split(data: bytes | memoryview) -> tuple[dict, memoryview]:
    view = memoryview(data)
    if len(view) < 8:
        raise SnapshotError(f"torn file: {len(view)} bytes")
    (header_len,) = struct.unpack_from("<Q", view)
    if header_len > len(view) - 8:
        raise SnapshotError(f"torn file: header of {header_len} bytes, {len(view) - 8} present")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except ValueError as exc:
        raise SnapshotError(f"corrupt header: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotError("corrupt header: not a JSON object")
    return header, view[8 + header_len :]


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, memoryview]:
    """(header bytes, data section) of a checksummed safetensors file: write them one after the other."""
    raw = safetensors.torch.save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={**metadata, "format": FORMAT}
    )
    header, data = _split(raw)
    header["__metadata__"]["checksum"] = _checksum(header, data)
    # Offsets are relative to the data section, so a new header (padded to 8 bytes, as safetensors does) fits.
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, data


def write(
    directory: Path, segment: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[Path, int]:
    """Write a snapshot atomically (temp file, fsync, rename, fsync directory); returns (path, bytes)."""
    head, data = encode(tensors, {**metadata, "wal_segment": str(segment)})
    final = snapshot_path(directory, segment)
    tmp = final.with_name(final.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, head)
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    fsync_dir(directory)
    return final, len(head) + len(data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read(path: Path) -> Snapshot:
    """Load and verify a snapshot; SnapshotError says what is wrong with a torn or corrupt file."""
    match = _NAME.match(path.name)
    if not match:
        raise SnapshotError(f"{path.name} is not named snapshot-<segment>.safetensors")
    data = path.read_bytes()
    header, body = _split(data)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if "checksum" not in meta:
        raise SnapshotError("no checksum in the metadata")
    actual = _checksum(header, body)
    if actual != meta["checksum"]:
        raise SnapshotError(f"checksum mismatch (file says {meta['checksum']}, content gives {actual})")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for inconsistent headers
        raise SnapshotError(f"unreadable tensors: {exc}") from None
    segment = int(match.group(1))
    if meta.get("wal_segment") != str(segment):
        raise SnapshotError(f"metadata names WAL segment {meta.get('wal_segment')}, the file name {segment}")
    return Snapshot(path, segment, tensors, dict(meta))


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete `.tmp` files a crash mid-snapshot left behind; returns them."""
    stale = [p for p in directory.glob("snapshot-*.safetensors.tmp")] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
