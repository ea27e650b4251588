"""A model file's metadata read from its safetensors header alone (no torch), and ConfigError.

config.py (`model.path`), model.py (`ServingModel.from_bytes`) and the CLI read model headers through here.
ConfigError lives here, not in config.py (which re-exports it), so that model.py can raise it without importing
the configuration module: config.py imports the Keras converter, which imports model.py.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says which key and what was expected."""


# safetensors refuses headers over 100 MB; a "length" beyond that is some other file's first 8 bytes.
_MAX_HEADER = 100 * 1024 * 1024


def model_file_metadata(source: str | Path | bytes, name: str | None = None) -> dict[str, str]:
    """The metadata of a safetensors file (a path, or its bytes), read from its header alone (no torch).

    ConfigError "X is not a safetensors model file (...)" for anything else: a CSV, a torch .pt, a Keras file."""
    name = name or str(source)
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            data, size = bytes(source[: 8 + _MAX_HEADER]), len(source)
        else:
            with open(source, "rb") as f:
                head = f.read(8)
                size = os.fstat(f.fileno()).st_size
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                data = head + (f.read(length) if 0 < length <= min(size - 8, _MAX_HEADER) else b"")
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{name} cannot be read: {exc.strerror}") from None
    not_safetensors = ConfigError(f"{name} is not a safetensors model file{_looks_like(data)}")
    if len(data) < 8:
        raise not_safetensors
    (length,) = struct.unpack("<Q", data[:8])
    if not 2 <= length <= min(size - 8, _MAX_HEADER) or data[8:9] != b"{":
        raise not_safetensors
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _looks_like(data: bytes) -> str:
    """What a non-safetensors file seems to be, to say what to do with it."""
    if data.startswith(b"PK\x03\x04"):
        return " (it is a zip archive: a torch .pt file or a .keras model; save the weights with safetensors)"
    if data.startswith(b"\x89HDF"):
        return " (it is an HDF5 file, e.g. a Keras .h5 model)"
    if data[:64].isascii() and data[:8].strip():
        return " (it starts with text, e.g. a CSV)"
    return ""
