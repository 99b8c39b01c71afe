"""The serving worker's own small config, built from ``Settings`` at the entry point
(``Settings.serving_config()``, ``Settings.client_config()``): serving never sees the whole
Settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stream.config import KafkaConfig


@dataclass(frozen=True)
class ServingConfig:
    """What a serving worker needs to know (topics, bounds, timings, index choice).

    Attributes:
        topic_requests: where requests arrive.
        topic_responses: the default reply topic (always an allowed ``reply_to``).
        topic_dlq: where unusable requests go.
        group: the serving consumer group.
        reply_prefixes: a ``reply_to`` other than ``topic_responses`` must start with one of
            these (empty: only ``topic_responses`` is allowed).
        input_topics: the system's other topics (events, profiles); like ``topic_requests``
            and ``topic_dlq``, never a ``reply_to``, whatever the prefixes allow.
        max_message_bytes: larger requests are refused (an error reply when their request id
            can be read, else a dead letter).
        max_k: largest ``k`` a request may ask for.
        session_timeout_ms: a silent member's partitions move after this long.
        threads: faiss intra-op threads of the serving process.
        index_kind / hnsw_*: the item index (see ``serving/index.py``, ``serving/graph.py``).
        swap_poll_s: how often the worker looks for a newer item snapshot.
        watchdog_s: the request loop's bound (``serving.worker.Watchdog``): a worker that has
            not been a stable group member with its partitions positioned for this long closes
            its Kafka consumer and joins with a new one; a request loop that has not come back
            from a Kafka call for this long exits the process (status
            ``serving.worker.EXIT_STUCK``) for its supervisor to restart it. 0: off.
    """

    topic_requests: str = "fm.requests"
    topic_responses: str = "fm.responses"
    topic_dlq: str = "fm.dlq"
    group: str = "fmstream-serving"
    reply_prefixes: tuple[str, ...] = ("fm.replies.",)
    input_topics: tuple[str, ...] = ("fm.events", "fm.users", "fm.items")
    max_message_bytes: int = 65536
    max_k: int = 1000
    session_timeout_ms: int = 10_000
    threads: int = 1
    index_kind: Literal["flat", "hnsw"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    hnsw_rebuild_s: float = 300.0
    swap_poll_s: float = 0.1
    watchdog_s: float = 45.0


@dataclass(frozen=True)
class ClientConfig:
    """What the request/reply client (``serving.client.FmClient``) needs.

    Attributes:
        kafka: how to reach the brokers.
        topic_requests: where requests go.
        topic_responses: the default reply topic.
        group: the serving group (named in timeout messages only).
    """

    kafka: KafkaConfig = field(default_factory=lambda: KafkaConfig("127.0.0.1:9092"))
    topic_requests: str = "fm.requests"
    topic_responses: str = "fm.responses"
    group: str = "fmstream-serving"


__all__ = ["ClientConfig", "ServingConfig"]
