"""The one door to kafka-python's private group coordinator (``KafkaConsumer._coordinator``).

Written against **kafka-python 3.0.12** (:data:`WRITTEN_AGAINST`; ``pyproject.toml`` pins
``>=3.0.12,<3.1`` so an upgrade is a deliberate act). ``KafkaConsumer``'s public API gives the
group state and generation (``group_metadata()``) but none of what the worker's zombie check
and clean handover need:

- when the coordinator last *answered* a heartbeat (``consumer.metrics()``'s
  ``last-heartbeat-seconds-ago`` is the last one *sent*, which stays fresh while the broker is
  silent, and ``metrics()`` is documented as an unstable interface);
- whether the next poll will rejoin the group, and a way to ask for a rejoin;
- an offset commit that can be awaited from an async rebalance listener (``commit()`` blocks on
  the IO loop the listener runs on).

Nothing else in fmstream reaches into the coordinator. Every method degrades instead of raising
when an attribute is gone (no heartbeat time, no early commit, no forced rejoin: the worker's
watchdog still renews a consumer that stays unhealthy), logs once which ones are missing, and
``tests/serving/test_coordinator.py`` fails on an upgrade that drops or changes any of them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

WRITTEN_AGAINST = "3.0.12"
"""The kafka-python release whose private coordinator this module was written against."""

USED = ("heartbeat.last_receive", "need_rejoin", "request_rejoin", "_commit_offsets_sync_async")
"""The coordinator's attributes this module reads (dotted: an attribute of an attribute)."""

_warned = False


def _lookup(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


class GroupCoordinator:
    """What the worker needs of a ``KafkaConsumer``'s group coordinator that kafka-python does
    not make public (see the module docstring for why each is not public)."""

    def __init__(self, consumer: Any) -> None:
        self._coordinator = getattr(consumer, "_coordinator", None)
        gone = self.missing()
        global _warned
        if gone and not _warned:
            _warned = True
            log.warning("kafka-python's group coordinator lacks %s (fmstream was written "
                        "against kafka-python %s): zombie detection by heartbeat age, forced "
                        "rejoins and the commit before a rebalance are off",
                        ", ".join(gone), WRITTEN_AGAINST)

    def missing(self) -> list[str]:
        """The attributes of :data:`USED` this consumer's coordinator lacks ([] when all are
        there, or all of them for a consumer without a coordinator)."""
        return [name for name in USED if _lookup(self._coordinator, name) is None]

    def last_heartbeat(self) -> float | None:
        """``time.monotonic()`` of the last heartbeat the coordinator answered (``-inf`` before
        the first); None when kafka-python no longer says."""
        received = _lookup(self._coordinator, "heartbeat.last_receive")
        return received if isinstance(received, int | float) else None

    def rejoin_needed(self) -> bool:
        """True when the consumer's next poll will (re)join the group; False when unknown."""
        need = _lookup(self._coordinator, "need_rejoin")
        try:
            return bool(need()) if need is not None else False
        except Exception:  # noqa: BLE001 - an internal changed: no early commit, nothing worse
            return False

    def request_rejoin(self) -> bool:
        """Make the consumer's next poll rejoin the group; False when kafka-python cannot."""
        request = _lookup(self._coordinator, "request_rejoin")
        if request is None:
            return False
        request()
        return True

    def commit_in_listener(self) -> Callable[..., Awaitable[None]] | None:
        """An offset commit to await inside an async rebalance listener,
        ``commit(offsets, timeout_ms=...)`` (the coordinator's own pre-rebalance commit, the one
        auto-commit uses); None when kafka-python has none."""
        commit = _lookup(self._coordinator, "_commit_offsets_sync_async")
        return commit if commit is not None and inspect.iscoroutinefunction(commit) else None
