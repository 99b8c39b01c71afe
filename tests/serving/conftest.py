"""Fixtures shared by the serving tests: the read side and the publisher's writer over the
test session's real Redis."""

from __future__ import annotations

import pytest
import redis

from fmstream.settings import Settings
from serving.store import VectorStore
from train.store_writer import StoreWriter


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> VectorStore:
    return VectorStore(redis_client, settings.redis_keys())


@pytest.fixture
def writer(redis_client: redis.Redis, settings: Settings) -> StoreWriter:
    return StoreWriter(redis_client, settings.redis_keys(), settings.keep_versions)
