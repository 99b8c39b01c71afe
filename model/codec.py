"""A small, pickle-free container for a JSON header plus named numpy arrays, sealed by sha256.

Sealed layout (little endian)::

    magic (8 bytes) | version (u32) | payload length (u64) | sha256(payload) (32 bytes) | payload
    payload = header length (u64) | header JSON (UTF-8) | array bytes (each 8-byte aligned)

The header's ``"arrays"`` entry lists ``name, dtype, shape, offset, nbytes`` of each array.
Nothing is executed on load (no pickle), so a hostile or damaged blob can only fail to parse.

The header is written with :func:`dumps_json`: orjson for the long lists (a 1M-user model's ids,
profiles and vocabularies: ~7x faster than ``json.dumps``) inside an exact ``json`` skeleton, so
a reader with ``json.loads`` gets exactly what ``json.dumps`` would have given it (ints beyond 64
bits, NaN/Infinity, non-string keys included); the format is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import orjson

_PREFIX = struct.Struct("<8sIQ32s")
PREFIX_SIZE = _PREFIX.size
_ALLOWED_DTYPES = {"<f4", "<f8", "<i2", "<i4", "<i8", "|u1", "|b1", "<u4", "<u8"}


class CodecError(ValueError):
    """The blob is not a valid sealed container; the message says what is wrong."""


def pack_chunks(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[bytes | memoryview]:
    """Serialise a JSON-able header and named arrays into payload pieces (no big copies)."""
    manifest = []
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        raw = memoryview(a).cast("B") if a.size else memoryview(b"")
        manifest.append(
            {
                "name": name,
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "offset": offset,
                "nbytes": raw.nbytes,
            }
        )
        chunks.append(raw)
        pad = (-raw.nbytes) % 8
        if pad:
            chunks.append(b"\0" * pad)
        offset += raw.nbytes + pad
    head = dumps_json({**header, "arrays": manifest})
    return [struct.pack("<Q", len(head)), head, *chunks]


_LONG = 64
"""Lists longer than this are handed to orjson whole; shorter containers are walked."""


def dumps_json(obj: Any) -> bytes:
    """Compact JSON (UTF-8) that ``json.loads`` reads back exactly as it reads
    ``json.dumps(obj, separators=(",", ":"))``.

    Long lists go through orjson, checked for the two things it writes differently: it refuses
    ints beyond 64 bits and non-string keys (caught), and writes NaN/Infinity as ``null``, so a
    long list whose orjson text holds ``null`` anywhere is written by ``json`` instead (exact,
    slower; ids, vocabularies and stored profiles never hold ``None``). Everything else is
    written by ``json``.
    """
    return _dumps(obj).encode("utf-8")


def _dumps(obj: Any) -> str:
    if type(obj) is dict and all(type(k) is str for k in obj):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in obj.items()) + "}"
    if type(obj) in (list, tuple):
        if len(obj) > _LONG:
            try:
                fast = orjson.dumps(obj)
            except TypeError:  # orjson.JSONEncodeError: big ints, non-str keys, other types
                pass
            else:
                if b"null" not in fast:
                    return fast.decode("utf-8")
            return json.dumps(obj, separators=(",", ":"))
        return "[" + ",".join(_dumps(v) for v in obj) + "]"
    return json.dumps(obj, separators=(",", ":"))


def pack(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise a JSON-able header and named arrays into one payload."""
    return b"".join(pack_chunks(header, arrays))


def unpack(payload: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`pack`; arrays are fresh writable copies."""
    mv = memoryview(payload)
    if len(mv) < 8:
        raise CodecError(f"payload of {len(mv)} bytes is shorter than its 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", mv, 0)
    if 8 + hlen > len(mv):
        raise CodecError(f"header length {hlen} runs past the payload end ({len(mv)} bytes)")
    try:
        header = json.loads(bytes(mv[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise CodecError("header is not an object with an 'arrays' list")
    base = 8 + hlen
    arrays: dict[str, np.ndarray] = {}
    for entry in header.pop("arrays"):
        try:
            name, dtype, shape = entry["name"], entry["dtype"], tuple(entry["shape"])
            off, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"bad array entry {entry!r}") from exc
        if dtype not in _ALLOWED_DTYPES:
            raise CodecError(f"array {name!r}: unsupported dtype {dtype!r}")
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count < 0 or count * dt.itemsize != nbytes or off < 0:
            raise CodecError(f"array {name!r}: shape {shape} does not match {nbytes} bytes")
        if base + off + nbytes > len(mv):
            raise CodecError(f"array {name!r} runs past the payload end")
        arrays[name] = (
            np.frombuffer(mv, dtype=dt, count=count, offset=base + off).reshape(shape).copy()
        )
    return header, arrays


def seal(magic: bytes, version: int, payload: bytes) -> bytes:
    """Prefix a payload with magic, version, length and its sha256."""
    return seal_prefix(magic, version, [payload]) + payload


def seal_prefix(magic: bytes, version: int, chunks: list[bytes | memoryview]) -> bytes:
    """The sealed prefix of a payload given as pieces (write it, then the pieces)."""
    if len(magic) != 8:
        raise ValueError("magic must be 8 bytes")
    h = hashlib.sha256()
    length = 0
    for c in chunks:
        h.update(c)
        length += memoryview(c).nbytes
    return _PREFIX.pack(magic, version, length, h.digest())


def unseal(magic: bytes, versions: tuple[int, ...], blob: bytes | memoryview) -> memoryview:
    """Check magic, version, length and checksum; return the payload.

    Raises:
        CodecError: wrong magic (not this kind of file), unknown version, truncated or
            over-long data, or checksum mismatch (corruption).
    """
    mv = memoryview(blob)
    if len(mv) < PREFIX_SIZE:
        raise CodecError(f"truncated: {len(mv)} bytes, shorter than the {PREFIX_SIZE}-byte header")
    got_magic, version, length, digest = _PREFIX.unpack_from(mv, 0)
    if got_magic != magic:
        raise CodecError(f"bad magic {got_magic!r}, expected {magic!r}: not this kind of data")
    if version not in versions:
        raise CodecError(f"unsupported format version {version}; this code reads {versions}")
    have = len(mv) - PREFIX_SIZE
    if have < length:
        raise CodecError(f"truncated: header promises {length} payload bytes, found {have}")
    if have > length:
        raise CodecError(f"{have - length} unexpected trailing bytes after the payload")
    payload = mv[PREFIX_SIZE:]
    if hashlib.sha256(payload).digest() != digest:
        raise CodecError("checksum mismatch: the payload is corrupt (sha256 differs)")
    return payload
