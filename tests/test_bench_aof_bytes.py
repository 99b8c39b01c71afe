"""bench/aof_bytes.py: the AOF bytes a window took, by kind of write (parser, and real Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from bench.aof_bytes import AofWindow, parse_resp_commands, table
from fmstream.settings import Settings


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_parser_sizes_each_write_by_its_key_kind_and_leaves_a_cut_one_out() -> None:
    user = resp(b"SET", b"p:user:u1", b"x" * 100)
    delta = resp(b"SET", b"p:items:delta:7", b"\r\n" * 50)  # CRLF inside a value
    chunk = resp(b"SET", b"p:items:7:chunk:0", b"y" * 10)
    parts = resp(b"SET", b"p:items:7:extra:item_parts", b"z")
    drop = resp(b"UNLINK", b"p:items:3:chunk:0", b"p:items:3:chunk:1")
    multi = resp(b"MULTI")
    cut = resp(b"SET", b"p:user:u2", b"w" * 30)[:-5]
    data = user + delta + chunk + parts + drop + multi + cut
    sizes, counts, used = parse_resp_commands(data, b"p:")
    assert sizes == {"user": len(user), "items:delta": len(delta),
                     "full snapshot chunk": len(chunk),
                     "full snapshot extra:item_parts": len(parts), "delete": len(drop),
                     "other (multi)": len(multi)}
    assert counts["user"] == 1 and used == len(data) - len(cut)
    rows = table(sizes, counts, seconds=2.0, events=10)
    assert rows[0][0] == "items:delta" and rows[-1][0] == "total"
    assert rows[-1][2] == f"{sum(sizes.values()) / 10:.0f}"


def test_parser_rejects_what_is_not_resp() -> None:
    with pytest.raises(ValueError, match="RESP array"):
        parse_resp_commands(b"SET a b\r\n", b"")


@pytest.fixture
def aof_on(redis_client: redis.Redis) -> Iterator[None]:
    """The session's Redis has no persistence (the default): AOF on for one test, then off."""
    redis_client.config_set("appendonly", "yes")
    # turning it on starts a rewrite that writes the base file: wait for its state, not a time
    while (info := redis_client.info("persistence"))["aof_rewrite_in_progress"] or info.get(
        "aof_rewrite_scheduled"
    ) or not info["aof_enabled"]:
        time.sleep(0.05)
    yield
    redis_client.config_set("appendonly", "no")


@pytest.mark.integration
@pytest.mark.usefixtures("aof_on")
def test_window_counts_writes_across_an_aof_rewrite(
    redis_client: redis.Redis, settings: Settings
) -> None:
    prefix = settings.redis_prefix
    window = AofWindow.start(redis_client, prefix)
    for i in range(5):
        redis_client.set(f"{prefix}user:u{i}", b"a" * 1000)
    redis_client.bgrewriteaof()
    while redis_client.info("persistence")["aof_rewrite_in_progress"]:
        time.sleep(0.05)  # the rewrite's state, not a fixed wait
    for i in range(5):
        redis_client.rpush(f"{prefix}hist:u{i}", b"i1", b"i2")
    sizes, counts, rewrites = window.stop()
    assert rewrites >= 1
    assert counts["user"] == 5 and counts["hist"] == 5
    assert sizes["user"] >= 5 * 1000


def test_window_needs_an_aof(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AofWindow, "_incr_files", staticmethod(lambda directory: []))
    with pytest.raises(RuntimeError, match="appendonly off"):
        AofWindow.start(redis_client)


def test_e2e_rows_split_probes_by_the_rewrite_windows() -> None:
    import numpy as np

    from bench.scale_e2e import near_rewrite, rewrite_rows

    windows = [(10.0, 14.0)]
    hit = near_rewrite([5.0, 8.5, 12.0, 14.0, 14.5], windows)
    assert hit.tolist() == [False, True, True, True, False]  # from 2 s before to its end
    rows = rewrite_rows([(9.0, 3.0), (20.0, 0.5)], [11.0], np.array([2.5]), windows)
    assert [r[1] for r in rows] == [1, 1, 1, 0]  # active in / out, inactive in / out
    assert rows[0][2] == "3.00 s" and rows[1][2] == "0.50 s" and rows[3][2] == "-"
    assert rewrite_rows([(9.0, 3.0)], [], np.zeros(0), []) == []  # no rewrite: no rows


@pytest.mark.integration
def test_rewrite_watch_sees_a_forced_rewrite(redis_client: redis.Redis) -> None:
    from bench.scale_e2e import RewriteWatch

    watch = RewriteWatch(redis_client, force_at=time.perf_counter())
    deadline = time.monotonic() + 60
    while not watch.windows and time.monotonic() < deadline:
        time.sleep(0.05)  # until the watcher saw a rewrite begin and end
    windows = watch.stop()
    assert watch.forced and len(windows) >= 1 and windows[0][1] >= windows[0][0]
