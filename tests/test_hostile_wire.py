"""Hostile input from Kafka clients we did not write, at the wire level: kcat (librdkafka) and
Kafka's own Java producer (``tests/java/TxnProducer.java``) against a real trainer and worker.

``tests/test_hostile.py`` sends hostile *values*; this sends hostile *record batches*: every
compression codec, binary and huge headers, null keys and values, aborted / committed /
idempotent transactional batches (control records), replies aimed at fmstream's own topics or
at topics that do not exist, and a Kafka client that lacks a codec's library.
Each test asserts ``applied + dead-lettered == sent`` (events) or
``answered + dead-lettered == sent`` (requests), and that the consumer keeps going.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
import redis
from kafka import codec as kafka_codec

from fmstream.app import run_trainer
from fmstream.settings import Settings
from serving.client import FmClient
from serving.store import VectorStore
from stream.consume import make_producer
from stream.replay import produce_profiles
from tests.kafka_helpers import KafkaIO, wait_for
from tests.test_hostile import (
    SCHEMA,
    STREAM,
    _all_committed,
    _since,
    checkpoint_meta,
    publish,
    start_workers,
    wait_checkpoint_past_all,
)
from tests.worker_helpers import RunningWorker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
JAVA_PRODUCER = ROOT / "tests" / "java" / "TxnProducer.java"
KAFKA_LIBS = ROOT / "infra" / "kafka" / "target" / "libs"
CODECS = ("gzip", "snappy", "lz4", "zstd")


def j(obj: object) -> bytes:
    return orjson.dumps(obj)


def kcat(s: Settings, topic: str, lines: list[bytes], *args: str | bytes,
         partition: int = 0) -> None:
    """Produce ``lines`` (one message each; ``key|value`` with ``-K |``) with kcat."""
    subprocess.run(["kcat", "-b", s.kafka_bootstrap, "-P", "-t", topic, "-p", str(partition),
                    *args], input=b"\n".join(lines) + b"\n", capture_output=True, check=True,
                   timeout=60)


def java(s: Settings, sections: list[tuple[str, str, int, list[str]]],
         timeout_ms: int | None = None) -> None:
    """Send ``(mode, topic, partition, ["key|value", ...])`` sections with Kafka's Java
    producer (modes: abort, commit, open, idempotent; see the Java file); its transactions
    time out after ``timeout_ms`` (None: the Java file's default, 10 s)."""
    timeout = "" if timeout_ms is None else f" {timeout_ms}"
    script = "".join(f"@{mode} {topic} {p}{timeout}\n" + "".join(f"{line}\n" for line in lines)
                     for mode, topic, p, lines in sections)
    done = subprocess.run(["java", "-cp", f"{KAFKA_LIBS}/*", str(JAVA_PRODUCER),
                           s.kafka_bootstrap], input=script.encode(), capture_output=True,
                          timeout=180, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr.decode()[-3000:])
    assert out.count("sent ") == len(sections), out


def event(user: str, item: str = "i1") -> bytes:
    return j({"user_id": user, "item_id": item, "ts": 1_700_000_000})


# --- the trainer ---------------------------------------------------------------------------


class Trainer:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_trainer, args=(s, self.stop), daemon=True,
                                       name="trainer")

    def __enter__(self) -> Trainer:
        producer = make_producer(self.s.kafka_config())
        produce_profiles(producer, self.s.topics(), STREAM.user_profiles(),
                         STREAM.item_profiles())
        producer.close()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the trainer did not stop"

    def applied(self) -> int:
        meta = checkpoint_meta(self.s)
        return 0 if meta is None else int(meta["events_applied"])

    def settle(self, kafka_io: KafkaIO) -> int:
        """Send a valid event to every partition, wait until a checkpoint covers them (the
        trainer went past everything sent before) and return the events applied so far."""
        wait_checkpoint_past_all(self.s, kafka_io, self.thread,
                                 lambda p: (b"probe", event(f"probe{p}")),
                                 "a checkpoint past everything sent")
        return self.applied()


def trainer_settings(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={
        "schema_path": SCHEMA, "dim": 8, "checkpoint_every_s": 0.5,
        "checkpoint_every_events": 1_000_000, "publish_items_s": 5.0, **update,
    })


def letters(kafka_io: KafkaIO, s: Settings, start: dict) -> list[dict]:
    return [orjson.loads(r.value)
            for r in _since(kafka_io.consume_all(s.topic_dlq, timeout_s=30), start)]


def test_the_trainer_learns_every_codec_and_header_and_only_committed_transactions(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    s = trainer_settings(settings)
    with Trainer(s) as trainer:
        before = trainer.settle(kafka_io)  # 6 probes
        dlq_start = kafka_io.end_offsets(s.topic_dlq)
        sent = 0
        # 1. compressed batches of every codec (50 alike events: librdkafka compresses them)
        for p, codec in enumerate(CODECS):
            kcat(s, s.topic_events, [b"u%d|" % n + event(f"{codec}{n}") for n in range(50)],
                 "-K", "|", "-z", codec, partition=p)
            sent += 50
        # 2. headers: a key that is not UTF-8, 300 of them, one of 100 kB, binary values
        kcat(s, s.topic_events, [event("hdr-binary-key")], "-H", b"\xff\xfe=v", "-H",
             b"bin=\x01\x02\xfe\xff", partition=4)
        kcat(s, s.topic_events, [event("hdr-many")],
             *[a for n in range(300) for a in ("-H", f"h{n}=v{n}")], partition=4)
        kcat(s, s.topic_events, [event("hdr-huge")], "-H", "big=" + "x" * 100_000, partition=4)
        sent += 3
        # 3. a null key (no -k), an empty value and a null value (-Z: empty means NULL)
        kcat(s, s.topic_events, [event("null-key")], partition=5)
        kcat(s, s.topic_events, [b"k|"], "-K", "|", partition=5)
        kcat(s, s.topic_events, [b"k|"], "-K", "|", "-Z", partition=5)
        sent += 1
        # 4. Kafka's Java producer: an aborted, a committed and an idempotent batch
        java(s, [("abort", s.topic_events, 1, [f"t|{event(f'aborted{n}').decode()}"
                                               for n in range(10)]),
                 ("commit", s.topic_events, 1, [f"t|{event(f'committed{n}').decode()}"
                                                for n in range(10)]),
                 ("idempotent", s.topic_events, 2, [f"-|{event(f'idem{n}').decode()}"
                                                    for n in range(10)])])
        sent += 20
        applied = trainer.settle(kafka_io) - before - 6
        dead = letters(kafka_io, s, dlq_start)
    reasons = sorted(d["reason"] for d in dead)  # the null and the empty value only
    assert len(reasons) == 2 and "null value" in reasons[0] and "zero-length" in reasons[1]
    assert applied == sent, (applied, sent)  # none aborted, none lost


def test_a_batch_the_trainer_cannot_decompress_is_dead_lettered_and_the_partition_goes_on(
    settings: Settings, kafka_io: KafkaIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a Kafka client without python-snappy (the fetch thread runs in this process)
    monkeypatch.setattr(kafka_codec, "snappy", None)
    s = trainer_settings(settings, trainer_fetch_process=False)
    with Trainer(s) as trainer:
        before = trainer.settle(kafka_io)
        dlq_start = kafka_io.end_offsets(s.topic_dlq)
        first = next(o for tp, o in kafka_io.end_offsets(s.topic_events).items()
                     if tp.partition == 0)
        kcat(s, s.topic_events, [event(f"s{n}") for n in range(50)], "-z", "snappy",
             "-X", "linger.ms=1000", partition=0)  # linger: one batch of 50
        kcat(s, s.topic_events, [event(f"after{n}") for n in range(5)], partition=0)
        applied = trainer.settle(kafka_io) - before - 6
        dead = letters(kafka_io, s, dlq_start)
    assert applied == 5  # the events after the unreadable batch
    (letter,) = dead
    assert letter["stage"] == "decode" and letter["error_class"] == "UnreadableBatch"
    assert (f"offsets {first}-{first + 49} of {s.topic_events}/0 (snappy) could not be read: "
            "UnsupportedCodecError: Libraries for snappy compression codec not found; install"
            ) in letter["reason"]
    assert letter["id"] == f"{s.topic_events}/0/{first + 49}"


# --- the worker ----------------------------------------------------------------------------


@pytest.fixture
def store(settings: Settings, redis_client: redis.Redis) -> VectorStore:
    return publish(settings, redis_client)


@contextmanager
def running_worker(s: Settings, store: VectorStore) -> Iterator[RunningWorker]:
    """One worker serving ``store`` for the ``with`` block."""
    (worker,) = start_workers(s, store, 1)
    try:
        yield worker
    finally:
        worker.close()


def request(rid: str, **fields: object) -> bytes:
    return j({"request_id": rid, "type": "i2i", "item_id": "i1", "k": 2, **fields})


class Answers:
    def __init__(self, s: Settings, kafka_io: KafkaIO) -> None:
        self.s, self.kafka_io = s, kafka_io
        wait_for(lambda: _all_committed(s, kafka_io), 90, "earlier requests committed")
        self.resp_start = kafka_io.end_offsets(s.topic_responses)
        self.dlq_start = kafka_io.end_offsets(s.topic_dlq)

    def answers(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in _since(self.kafka_io.consume_all(self.s.topic_responses, timeout_s=30),
                        self.resp_start):
            body = orjson.loads(r.value)
            out.setdefault(body["request_id"], []).append(body)
        return out

    def wait(self, ids: set[str], timeout: float = 120) -> dict[str, list[dict]]:
        wait_for(lambda: ids <= set(self.answers()), timeout, f"answers to {len(ids)} requests",
                 poll_s=0.5)
        wait_for(lambda: _all_committed(self.s, self.kafka_io), 90, "the requests committed")
        return self.answers()

    def letters(self) -> list[dict]:
        return letters(self.kafka_io, self.s, self.dlq_start)


def test_a_worker_answers_every_codec_and_header_and_only_committed_transactions(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO
) -> None:
    s = settings
    with running_worker(s, store) as worker:
        answers = Answers(s, kafka_io)
        want: set[str] = set()
        for p, codec in enumerate(CODECS):
            ids = [f"{codec}-{n}" for n in range(30)]
            kcat(s, s.topic_requests, [request(i) for i in ids], "-z", codec, partition=p)
            want |= set(ids)
        kcat(s, s.topic_requests, [request("hdr-binary-key")], "-H", b"\xff\xfe=v", partition=4)
        kcat(s, s.topic_requests, [request("hdr-huge")], "-H", "big=" + "x" * 100_000,
             partition=4)
        want |= {"hdr-binary-key", "hdr-huge"}
        # aborted requests before committed ones on the same partition: once the committed
        # ones are answered and committed, an aborted one would have been answered already
        java(s, [("abort", s.topic_requests, 5, [f"-|{request(f'aborted{n}').decode()}"
                                                 for n in range(10)]),
                 ("commit", s.topic_requests, 5, [f"-|{request(f'committed{n}').decode()}"
                                                  for n in range(10)]),
                 ("idempotent", s.topic_requests, 5, [f"-|{request(f'idem{n}').decode()}"
                                                      for n in range(10)])])
        want |= {f"committed{n}" for n in range(10)} | {f"idem{n}" for n in range(10)}
        got = answers.wait(want)
        assert set(got) == want, set(got) ^ want  # no aborted request answered
        assert all(len(v) == 1 and v[0]["error"] is None for v in got.values())
        assert answers.letters() == []
        assert worker.thread.is_alive()


def test_a_request_batch_the_worker_cannot_decompress_is_one_dead_letter(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    for lib in ("snappy", "lz4", "lz4f", "lz4framed", "zstd"):  # a client without the libraries
        monkeypatch.setattr(kafka_codec, lib, None)
    s = settings
    with running_worker(s, store) as worker:
        answers = Answers(s, kafka_io)
        sent = {codec: [f"{codec}-{n}" for n in range(30)] for codec in ("snappy", "lz4", "zstd")}
        for codec, ids in sent.items():
            # linger: one batch of 30 (librdkafka may still send a batch uncompressed, or split it)
            kcat(s, s.topic_requests, [request(i) for i in ids], "-z", codec,
                 "-X", "linger.ms=1000", partition=0)
        after = {f"after-{n}" for n in range(3)}
        kcat(s, s.topic_requests, [request(i) for i in sorted(after)], partition=0)
        got = answers.wait(after)
        dead = answers.letters()
        unread = 0
        for d in dead:
            assert d["stage"] == "decode" and d["error_class"] == "UnreadableBatch", d
            m = re.search(r"record batch at offsets (\d+)-(\d+) of .* \((\w+)\) could not be "
                          r"read: UnsupportedCodecError", d["reason"])
            assert m, d["reason"]
            assert d["id"] == f"{s.topic_requests}/0/{m[2]}"
            unread += int(m[2]) - int(m[1]) + 1
        # every codec's compressed batches are dead letters, nothing else is
        assert {re.search(r"\((\w+)\) could not", d["reason"])[1] for d in dead} == set(sent)
        answered = set(got) - after
        assert answered <= {i for ids in sent.values() for i in ids}  # sent uncompressed
        assert len(answered) + unread == 90  # every request answered or one batch's letter
        assert worker.thread.is_alive()


def test_a_client_reads_its_answers_past_a_record_kafka_python_cannot_read(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO
) -> None:
    s = settings
    with running_worker(s, store):
        with FmClient(s) as client:
            # someone else's records on the response topic: a binary header key, and a batch
            # whose codec this process lacks (kafka-python's parser hung the reply thread)
            kcat(s, s.topic_responses, [b'{"request_id": "x"}'], "-H", b"\xff=v", partition=0)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(kafka_codec, "zstd", None)
                kcat(s, s.topic_responses, [b'{"request_id": "y", "pad": "%s"}' % (b"z" * 500)],
                     "-z", "zstd", partition=0)
                for n in range(3):
                    answer = client.request({"type": "i2i", "item_id": "i1", "k": 2}, timeout=30)
                    assert answer.error is None and len(answer.items) == 2, n


def test_replies_never_go_to_fmstreams_own_topics_nor_wait_on_missing_ones(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO
) -> None:
    # an operator's broad prefix ("fm.") covers the request, event and profile topics too
    s = settings.model_copy(update={"reply_topic_prefixes": "fm."})
    with running_worker(s, store):
        answers = Answers(s, kafka_io)
        own = [s.topic_requests, s.topic_events, s.topic_users, s.topic_items, s.topic_dlq]
        ends = {t: kafka_io.end_offsets(t) for t in own if t != s.topic_dlq}
        kcat(s, s.topic_requests, [request(f"own-{n}", reply_to=t) for n, t in enumerate(own)],
             partition=1)
        # a flood of requests whose reply topic does not exist (auto-creation off, a name
        # that collides): each used to stop the worker for 5 s; interleaved with good ones
        flood = [request(f"missing-{n}", reply_to=f"fm.replies.missing_{n}") if n % 2 else
                 request(f"good-{n}") for n in range(60)]
        kcat(s, s.topic_requests, flood, partition=2)
        want = {f"own-{n}" for n in range(len(own))} | {f"missing-{n}" for n in range(1, 60, 2)}
        want |= {f"good-{n}" for n in range(0, 60, 2)}
        got = answers.wait(want, timeout=90)
        assert set(got) == want
        for rid, (body,) in got.items():
            if rid.startswith("good"):
                assert body["error"] is None
            else:
                assert body["error"]["code"] == "invalid_request", body
                assert body["model_version"] is None and body["item_version"] is None
        assert "own input or dead-letter topics" in got["own-1"][0]["error"]["message"]
        assert "not a topic of the broker" in got["missing-1"][0]["error"]["message"]
        assert answers.letters() == []
        for t, before in ends.items():  # nothing was written into fmstream's own topics
            after = kafka_io.end_offsets(t)
            extra = len(own) + len(flood) if t == s.topic_requests else 0  # the requests
            assert sum(after.values()) - sum(before.values()) == extra, t
        assert not any(t.startswith("fm.replies.missing") for t in kafka_io_topics(kafka_io))


def kafka_io_topics(kafka_io: KafkaIO) -> set[str]:
    from stream.connect import kafka_consumer

    consumer = kafka_consumer(kafka_io.kafka, group_id=None)
    try:
        return set(consumer.topics())
    finally:
        consumer.close()


@pytest.fixture(autouse=True)
def _quiet_kafka(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level("ERROR", logger="kafka")
    yield
