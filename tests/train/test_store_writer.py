"""StoreWriter's vectorised user-record writes against the real Redis of the test session: the
bytes are exactly serving.users' layout, in several MSETs when many, failures raise."""

from __future__ import annotations

import numpy as np
import pytest
import redis

import train.store_writer as store_writer
from fmstream.settings import Settings
from serving.errors import ServingError
from serving.store import VectorStore
from serving.users import decode_user_record, encode_user_records
from stream.connect import redis_client as connect_redis
from train.store_writer import StoreWriter


@pytest.fixture
def writer(redis_client: redis.Redis, settings: Settings) -> StoreWriter:
    return StoreWriter(redis_client, settings.redis_keys(), settings.keep_versions)


def parts(n: int, width: int = 6, slots: int = 4, seed: int = 0):
    """Own parts, keys (0 = padding; every count 0..slots occurs) and weights of n users."""
    rng = np.random.default_rng(seed)
    own = rng.standard_normal((n, width)).astype(np.float32)
    keys = rng.integers(1, 1 << 40, (n, slots)).astype(np.int64)
    keys[rng.random((n, slots)) < 0.4] = 0  # padding anywhere, not only at the end
    keys[0] = 0
    keys[1] = [7, 0, 9, 0]
    weights = rng.random((n, slots)).astype(np.float32)
    return own, keys, weights


def test_records_are_byte_for_byte_the_serving_layout(
    writer: StoreWriter, redis_client: redis.Redis, settings: Settings
) -> None:
    own, keys, weights = parts(40)
    ids = [f"u{j}" for j in range(38)] + ["ü:é 1", "u3"]  # unicode, a separator, a repeat
    writer.put_user_records(ids, 12, 1_700_000_000.25, own, keys, weights)
    expected = dict(zip(ids, encode_user_records(12, 1_700_000_000.25, own, keys, weights),
                        strict=True))  # the repeated id: the later record wins, as in MSET
    keys_ = settings.redis_keys()
    got = redis_client.mget([keys_.user(u) for u in expected])
    assert got == list(expected.values())
    rec = decode_user_record(got[1])
    assert rec is not None and rec.keys.tolist() == [7, 9] and rec.version == 12
    assert decode_user_record(got[0]).keys.size == 0  # type: ignore[union-attr]
    # what a worker reads back through the store
    store = VectorStore(redis_client, keys_)
    raw = store.redis.get(keys_.user("ü:é 1"))
    np.testing.assert_array_equal(decode_user_record(raw).own, own[38])  # type: ignore[union-attr]


def test_many_users_go_out_in_several_commands(
    writer: StoreWriter, redis_client: redis.Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_writer, "_RECORDS_PER_MSET", 3)
    own, keys, weights = parts(10, seed=1)
    ids = [f"c{j}" for j in range(10)]

    def msets() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_mset", {}).get("calls", 0))

    before = msets()
    writer.put_user_records(ids, 3, 5.0, own, keys, weights)
    assert msets() - before == 4  # bounded commands (a worker's MGET waits for each one)
    got = redis_client.mget([settings.redis_keys().user(u) for u in ids])
    assert got == encode_user_records(3, 5.0, own, keys, weights)
    writer.put_user_records([], 4, 5.0, own[:0], keys[:0], weights[:0])  # nothing: no command


def test_shapes_that_do_not_match_are_refused(writer: StoreWriter) -> None:
    own, keys, weights = parts(4)
    with pytest.raises(ServingError, match="4 user ids"):
        writer.put_user_records(["a", "b", "c", "d"], 1, 0.0, own[:3], keys, weights)
    with pytest.raises(ServingError, match="expected"):
        writer.put_user_records(["a", "b", "c", "d"], 1, 0.0, own, keys, weights[:, :2])


def test_redis_unreachable_raises_a_connection_error(settings: Settings) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    client = connect_redis(config.redis_config(), decode_responses=False)
    writer = StoreWriter(client, settings.redis_keys())
    own, keys, weights = parts(2)
    with pytest.raises(redis.ConnectionError):
        writer.put_user_records(["a", "b"], 1, 0.0, own, keys, weights)


def test_packed_commands_are_what_redis_pys_packer_sends(
    writer: StoreWriter, redis_client: redis.Redis, settings: Settings
) -> None:
    from hiredis import pack_command

    own, keys, weights = parts(3, seed=2)
    ids = ["p0", "p\u00e9", "p2"]  # a non-ASCII id: encoded as redis-py would (UTF-8)
    values = encode_user_records(7, 1.5, own, keys, weights)
    prefix = settings.redis_keys().user("")
    args = ("MSET", *[x for u, v in zip(ids, values, strict=True) for x in (prefix + u, v)])
    conn = redis_client.connection_pool.get_connection()
    try:
        assert b"".join(conn.pack_command(*args)) == pack_command(args)
    finally:
        redis_client.connection_pool.release(conn)
    writer.put_user_records(ids, 7, 1.5, own, keys, weights)
    assert redis_client.mget([prefix + u for u in ids]) == values


def test_a_refused_packed_command_raises_and_leaves_the_pool_usable(
    writer: StoreWriter, redis_client: redis.Redis, settings: Settings
) -> None:
    from hiredis import pack_command

    key = settings.redis_keys().user("refused")
    commands = [pack_command(("SET", key, b"1")), pack_command(("NOSUCHCOMMAND", "x")),
                pack_command(("PING",))]
    with pytest.raises(redis.ResponseError, match="(?i)unknown command"):
        writer.send_packed(commands)
    assert redis_client.get(key) == b"1"  # the commands before it took effect
    assert writer.send_packed([pack_command(("PING",))]) == [b"PONG"]  # no stale reply left
    assert redis_client.ping() is True
    assert writer.send_packed([]) == []


def test_put_histories_replaces_lists_in_bounded_scripted_calls(
    writer: StoreWriter, redis_client: redis.Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A republish's histories: each user's list replaced (newest first, cut to max_len), users
    with an empty history left alone, ids of any text, at most _HISTORY_USERS_PER_CALL users per
    scripted call; more than 1,000 items of one user still go (RPUSH in slices)."""
    monkeypatch.setattr(store_writer, "_HISTORY_USERS_PER_CALL", 2)
    keys = settings.redis_keys()
    redis_client.rpush(keys.history("old"), b"stale1", b"stale2")
    redis_client.rpush(keys.history("kept"), b"k1")
    users = ["old", "kept", 'ü:"é 1', "u3", "long"]
    lists = [["i3", "i2", "i1"], [], ["x\\y", "z\"w"], ["a", "b", "c", "d"],
             [f"i{j}" for j in range(1500)]]

    def evals() -> int:
        stats = redis_client.info("commandstats")
        return sum(int(v.get("calls", 0)) for k, v in stats.items() if k.startswith("cmdstat_eval"))

    before = evals()
    assert writer.put_histories(users, lists, max_len=1200) == 4
    assert evals() - before == 2  # 4 users with a history, 2 per call

    def raw(user: str) -> list[str]:
        return [v.decode() for v in redis_client.lrange(keys.history(user), 0, -1)]

    assert raw("old") == ["i3", "i2", "i1"]
    assert raw("kept") == ["k1"]
    assert raw('ü:"é 1') == ["x\\y", "z\"w"]
    assert raw("u3") == ["a", "b", "c", "d"]
    assert raw("long") == [f"i{j}" for j in range(1200)]
    assert writer.put_histories([], [], max_len=5) == 0
    with pytest.raises(ServingError, match="2 users for 1 histories"):
        writer.put_histories(["a", "b"], [["i"]], max_len=5)
