"""Replays a data set into the topics: profiles first, then events, optionally at a fixed rate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from kafka import KafkaProducer

from stream.config import Topics
from stream.schemas import dumps

log = logging.getLogger(__name__)


def produce_profiles(
    producer: KafkaProducer, topics: Topics, users: Iterable[dict], items: Iterable[dict]
) -> tuple[int, int]:
    """Send user and item profiles (keyed by id, compacted topics). Returns the counts."""
    n_users = n_items = 0
    for msg in users:
        producer.send(topics.users, key=msg["user_id"].encode(), value=dumps(msg))
        n_users += 1
    for msg in items:
        producer.send(topics.items, key=msg["item_id"].encode(), value=dumps(msg))
        n_items += 1
    producer.flush()
    return n_users, n_items


def produce_events(
    producer: KafkaProducer,
    topics: Topics,
    events: Iterable[dict],
    *,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send events keyed by user id, at ``rate`` events/s if given (else as fast as possible)."""
    start = time.monotonic()
    n = 0
    for msg in events:
        producer.send(topics.events, key=msg["user_id"].encode(), value=dumps(msg))
        n += 1
        if rate and n % 100 == 0:
            ahead = n / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        if progress is not None and n % 1000 == 0:
            progress(1000)
    producer.flush()
    if progress is not None:
        progress(n % 1000)
    return n
