"""What the Redis append-only file (AOF) took in a window, in bytes by kind of write.

The AOF grows by the RESP bytes of every write command Redis applies (a Lua script's effects,
not the script), and Redis rewrites it (a fork plus a child reading the whole data set) each time
it has doubled (``auto-aof-rewrite-percentage 100``). So the bytes it takes per second, and which
writes they come from, set how often the rewrites come.

Use: ``window = AofWindow.start(client)`` before a phase, ``window.stop()`` after it -> bytes by
kind. The current incremental AOF file is opened at the start, and each file a rewrite opens
during the window as soon as the manifest names it (an open file survives the next rewrite
deleting it); those are read from their start.

Kinds are named by the key's first segments after the deployment prefix (``user``, ``hist``,
``items:delta``, ``items:extra:item_parts``, ...) and the command (``DEL``/``UNLINK`` of any key
is ``delete``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import redis

_WRITE_KINDS = {b"UNLINK": "delete", b"DEL": "delete"}


def _kind(cmd: bytes, key: bytes | None, prefix: bytes) -> str:
    """A short name for one write (see the module docstring)."""
    name = cmd.upper()
    if name in _WRITE_KINDS:
        return _WRITE_KINDS[name]
    if name in (b"MULTI", b"EXEC", b"SELECT") or key is None:
        return "other (" + name.decode(errors="replace").lower() + ")"
    if key.startswith(prefix):
        key = key[len(prefix):]
    parts = key.split(b":")
    head = parts[0].decode(errors="replace")
    if head == "items" and len(parts) >= 3 and parts[1].isdigit():
        # items:{v}:chunk:i, items:{v}:ids:i, items:{v}:extra:name, items:{v}:manifest
        what = parts[2].decode(errors="replace")
        if what == "extra" and len(parts) >= 4:
            what += ":" + parts[3].decode(errors="replace")
        return "full snapshot " + what
    if head == "items" and len(parts) >= 2:
        return "items:" + parts[1].decode(errors="replace")
    return head


def parse_resp_commands(data: bytes | memoryview, prefix: bytes) -> tuple[Counter, Counter, int]:
    """Bytes and commands by kind in ``data`` (whole RESP arrays; a cut last one is left out).

    Returns:
        (bytes by kind, commands by kind, bytes parsed).
    """
    buf = bytes(data)
    sizes: Counter = Counter()
    counts: Counter = Counter()
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        if buf[pos:pos + 1] != b"*":
            raise ValueError(f"AOF: expected a RESP array at byte {pos}, got {buf[pos:pos + 8]!r}")
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        argc = int(buf[pos + 1:eol])
        pos = eol + 2
        args: list[bytes] = []
        cut = False
        for i in range(argc):
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                cut = True
                break
            n = int(buf[pos + 1:eol])
            pos = eol + 2
            if pos + n + 2 > end:
                cut = True
                break
            if i < 2:
                args.append(buf[pos:pos + n])
            pos += n + 2
        if cut:
            return sizes, counts, start
        kind = _kind(args[0], args[1] if len(args) > 1 else None, prefix)
        sizes[kind] += pos - start
        counts[kind] += 1
    return sizes, counts, pos


@dataclass
class AofWindow:
    """The AOF bytes Redis appended between :meth:`start` and :meth:`stop`."""

    client: redis.Redis
    directory: Path
    prefix: bytes
    handles: list[tuple[BinaryIO, int]]
    seen: set[str] = field(default_factory=set)
    missed: int = 0
    poll_s: float = 0.05
    _done: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        # the window owns its watcher: it starts with the window, stop() ends it
        self._thread = threading.Thread(target=self._watch, args=(self.poll_s,), daemon=True)
        self._thread.start()

    @staticmethod
    def _incr_files(directory: Path) -> list[str]:
        manifest = next(directory.glob("*.manifest"), None)
        if manifest is None:
            return []
        names = []
        for line in manifest.read_text().splitlines():
            words = line.split()
            meta = dict(zip(words[::2], words[1::2], strict=False))
            if meta.get("type") == "i" and "file" in meta:
                names.append(meta["file"])
        return names

    @classmethod
    def start(cls, client: redis.Redis, prefix: str = "", poll_s: float = 0.05) -> AofWindow:
        """Open the current incremental AOF file at its end (raises if AOF is off); a thread
        opens each file a rewrite starts as soon as the manifest names it (an open file can be
        read after the rewrite after it deletes it)."""
        conf = client.config_get("dir")
        dirname = client.config_get("appenddirname").get("appenddirname", "appendonlydir")
        directory = Path(conf["dir"]) / dirname
        files = cls._incr_files(directory)
        if not files:
            raise RuntimeError(f"no incremental AOF file in {directory} (appendonly off?)")
        handle = open(directory / files[-1], "rb")  # noqa: SIM115 - closed by stop()
        offset = os.fstat(handle.fileno()).st_size
        return cls(client, directory, prefix.encode(), [(handle, offset)], set(files),
                   poll_s=poll_s)

    def _open_new(self) -> None:
        for name in self._incr_files(self.directory):
            if name in self.seen:
                continue
            try:
                self.handles.append((open(self.directory / name, "rb"), 0))  # noqa: SIM115
            except FileNotFoundError:  # already gone: its bytes are lost (counted as missed)
                self.missed += 1
            self.seen.add(name)

    def _watch(self, poll_s: float) -> None:
        while not self._done.wait(poll_s):
            try:
                self._open_new()
            except OSError:  # a manifest being replaced: next time
                continue

    def stop(self) -> tuple[Counter, Counter, int]:
        """Bytes by kind, commands by kind, and rewrites seen (new incremental files).

        Raises:
            RuntimeError: a rewrite's file was deleted before it could be opened (bytes lost).
        """
        self._done.set()
        self._thread.join()
        # appendfsync everysec: Redis may hold writes back (up to 2 s) while a background
        # fsync runs; read the files once its AOF buffer is empty
        deadline = time.monotonic() + 10.0
        while (self.client.info("persistence").get("aof_buffer_length", 0)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        self._open_new()
        sizes: Counter = Counter()
        counts: Counter = Counter()
        for handle, offset in self.handles:
            try:
                handle.seek(offset)
                s, c, _ = parse_resp_commands(handle.read(), self.prefix)
                sizes.update(s)
                counts.update(c)
            finally:
                handle.close()
        if self.missed:
            raise RuntimeError(f"{self.missed} AOF files were gone before they were read")
        return sizes, counts, len(self.handles) - 1


def table(sizes: Counter, counts: Counter, seconds: float, events: float) -> list[list[str]]:
    """Rows (kind, MB/s, bytes per event, commands/s, share) largest first, and a total."""
    total = sum(sizes.values()) or 1
    rows = []
    for kind, b in sizes.most_common():
        rows.append([kind, f"{b / seconds / 1e6:.3f}", f"{b / max(events, 1):.0f}",
                     f"{counts[kind] / seconds:.1f}", f"{100 * b / total:.1f}%"])
    rows.append(["total", f"{total / seconds / 1e6:.3f}", f"{total / max(events, 1):.0f}",
                 f"{sum(counts.values()) / seconds:.1f}", "100%"])
    return rows


def short_note(sizes: Counter, seconds: float) -> str:
    """``kind a.b MB/s`` for every kind over 1% of the bytes, largest first."""
    total = sum(sizes.values()) or 1
    return ", ".join(f"{k} {b / seconds / 1e6:.2f}" for k, b in sizes.most_common()
                     if b >= 0.01 * total)


__all__ = ["AofWindow", "parse_resp_commands", "short_note", "table"]
