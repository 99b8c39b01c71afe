"""Atomic, checksummed checkpoints of an :class:`~model.online.OnlineFM` plus caller metadata.

A checkpoint holds parameters, optimiser state, vocabularies, admission counts and expiry
clocks, catalogs with profiles, sampler counts and RNG states, and the caller's metadata dict
(the trainer stores its Kafka offsets there), so a restored model scores identically and
continues training identically.

File layout: ``FMCKPT01`` magic, format version, payload length, sha256 of the payload, then
the payload (JSON header + raw arrays, no pickle; see :mod:`model.codec`). Files are named
``ckpt-<12-digit sequence>.fmck`` and written atomically: temp file in the same folder, fsync,
rename, fsync of the folder. The write may run in another process (:func:`write_pending`, e.g.
a forked child) and the rename in the owner (:func:`install_pending`). A reader therefore sees a
whole old file or a whole new one; a file damaged later (bit rot, truncation) fails its length
or checksum test and is refused with :class:`CheckpointError` before anything is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from model.codec import CodecError, pack_chunks, seal_prefix, unpack, unseal
from model.errors import CheckpointError, ModelError
from model.online import OnlineFM

log = logging.getLogger(__name__)

MAGIC = b"FMCKPT01"
VERSION = 1
SUFFIX = ".fmck"
_NAME_RE = re.compile(r"^ckpt-(\d{12})\.fmck$")
_TEMP_RE = re.compile(r"^\.ckpt-.*\.tmp$")  # this version's and the previous one's temp names


def checkpoint_files(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (by sequence number)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    directory: Path, model: OnlineFM, metadata: dict[str, Any], keep: int = 3
) -> Path:
    """Write a new checkpoint atomically and keep only the newest ``keep`` files.

    The same as :func:`write_pending` then :func:`install_pending` (a trainer that writes in the
    background runs the first in a child process and the second itself).

    Args:
        directory: created if missing.
        model: the model to save (not modified).
        metadata: JSON-serialisable dict stored beside the model (e.g. Kafka offsets).
        keep: how many checkpoints to keep (>= 1); older ones are deleted after the write.

    Returns:
        The path of the new file, ``ckpt-<sequence>.fmck`` (sequence = newest + 1).

    Raises:
        CheckpointError: metadata not JSON-serialisable, or the write failed (no partial file
            is left under the final name).
    """
    if keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    pending = pending_path(directory)
    write_pending(pending, model, metadata)
    return install_pending(pending, keep)


def pending_path(directory: Path) -> Path:
    """A fresh temp name in ``directory`` (created if missing) for :func:`write_pending`.

    Temp names start with ``.ckpt-`` and end with ``.tmp``: never a checkpoint name, so a
    half-written one is never read; :func:`remove_stale_pending` deletes those a killed writer
    left behind.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-pending.", suffix=".tmp", dir=d)
    os.close(fd)
    return Path(tmp)


def write_pending(path: Path, model: OnlineFM, metadata: dict[str, Any]) -> None:
    """Serialise ``model`` + ``metadata`` into ``path`` (a temp name) and fsync it.

    Raises:
        CheckpointError: metadata not JSON-serialisable, or the write failed; ``path`` is then
            removed.
    """
    header, arrays = model.state()
    header = {"format": "fmstream-checkpoint", "model": header, "metadata": metadata}
    try:
        try:
            chunks = pack_chunks(header, arrays)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"cannot serialise the checkpoint (is metadata JSON?): {exc}"
            ) from exc
        prefix = seal_prefix(MAGIC, VERSION, chunks)
        try:
            with open(path, "wb") as fh:
                fh.write(prefix)
                for c in chunks:
                    fh.write(c)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def install_pending(pending: Path, keep: int | None = 3) -> Path:
    """Give a complete, fsynced temp file the next checkpoint name (atomic rename, fsync of the
    folder) and delete all but the newest ``keep`` checkpoints (``None``: delete nothing; the
    caller prunes later with :func:`prune_checkpoints`, e.g. off its critical thread: deleting
    a 170 MB file takes ~0.1 s).

    Raises:
        CheckpointError: the rename failed (the temp file is removed; no file under a final
            name changed).
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    d = Path(pending).parent
    existing = checkpoint_files(d)
    seq = int(_NAME_RE.match(existing[-1].name).group(1)) + 1 if existing else 1  # type: ignore[union-attr]
    final = d / f"ckpt-{seq:012d}{SUFFIX}"
    try:
        os.replace(pending, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(pending)
        raise CheckpointError(f"cannot install checkpoint {final}: {exc}") from exc
    _fsync_dir(d)
    if keep is not None:
        prune_checkpoints(d, keep)
    return final


def prune_checkpoints(directory: Path, keep: int = 3) -> int:
    """Delete all but the newest ``keep`` (>= 1) checkpoints in ``directory``; how many went."""
    if keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    removed = 0
    for old in checkpoint_files(Path(directory))[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
            removed += 1
    return removed


def remove_stale_pending(directory: Path) -> int:
    """Delete temp files that writers killed mid-write left in ``directory``; returns how many.

    Call it only while no writer of this folder runs (the trainer does, holding the lease,
    before its first checkpoint).
    """
    d = Path(directory)
    if not d.is_dir():
        return 0
    removed = 0
    for p in d.iterdir():
        if _TEMP_RE.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def load_checkpoint(path: Path) -> tuple[OnlineFM, dict[str, Any]]:
    """Read a checkpoint: ``(model, metadata)``.

    Raises:
        CheckpointError: missing, truncated, corrupt (checksum), wrong magic/version or
            inconsistent content; the message names the file. Nothing is half-loaded.
    """
    p = Path(path)
    try:
        blob = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read checkpoint: {exc}") from exc
    try:
        header, arrays = unpack(unseal(MAGIC, (VERSION,), blob))
    except CodecError as exc:
        raise CheckpointError(f"{p}: invalid checkpoint: {exc}") from exc
    if header.get("format") != "fmstream-checkpoint":
        raise CheckpointError(f"{p}: not an fmstream checkpoint (format {header.get('format')!r})")
    try:
        model = OnlineFM.from_state(header["model"], arrays)
    except (ModelError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{p}: checkpoint content is inconsistent: {exc!r}") from exc
    metadata = header.get("metadata")
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{p}: metadata is not a dict")
    return model, metadata


def latest_checkpoint(directory: Path) -> tuple[OnlineFM, dict[str, Any]] | None:
    """The newest checkpoint that loads, skipping (and logging) corrupt ones; None if none."""
    for p in reversed(checkpoint_files(Path(directory))):
        try:
            return load_checkpoint(p)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint %s: %s", p, exc)
    return None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
