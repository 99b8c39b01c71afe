"""The one door to kafka-python's private fetcher internals (``KafkaConsumer._fetcher`` and its
``Fetcher.PartitionRecords``, ``DefaultRecordBatch``'s buffer).

Written against **kafka-python 3.0.12** (:data:`WRITTEN_AGAINST`; ``pyproject.toml`` pins
``>=3.0.12,<3.1`` so an upgrade is a deliberate act). kafka-python has no public hook for how a
fetched record batch is parsed: ``key_deserializer``/``value_deserializer`` (its only per-record
options) run on each record *after* its own parser, which raises from inside its record iterator
on a batch it cannot read (a codec whose library is missing, a payload that does not decompress,
a record whose structure lies, a header key that is not UTF-8), and the fetcher then spins on the
exhausted iterator for good. :mod:`stream.record_parse` replaces that parse for one consumer;
what it needs of kafka-python that is not public is here and nowhere else:

- :class:`PartitionRecords`, the one subclass of ``Fetcher.PartitionRecords`` (the per-partition
  state the fetcher builds for each fetched response): its ``_unpack_records`` calls the
  subclass's :meth:`PartitionRecords.unpack`, its ``take`` drains the records on an error (so the
  fetcher refetches instead of spinning), and :meth:`PartitionRecords.skip_aborted` wraps
  kafka-python's read_committed bookkeeping;
- :func:`uncompress` and :func:`payload`: a v2 batch's decompression and its record bytes;
- :func:`use_records`: the swap of one consumer's ``PartitionRecords`` class.

The state a subclass reads and writes (``next_fetch_offset``, ``records_read``, ...) is
kafka-python's; :data:`USED` names all of it. When any of it is gone, :func:`use_records` logs
once which, and leaves the consumer on kafka-python's own parser (the records are the same; an
unreadable batch stops the partition again, as it does in plain kafka-python);
``tests/stream/test_fetcher.py`` fails on an upgrade that drops or changes any of it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

from kafka.consumer import fetcher as _fetcher_module
from kafka.consumer.fetcher import ConsumerRecord, IsolationLevel
from kafka.record.default_records import DefaultRecordBatch

log = logging.getLogger(__name__)

__all__ = ["ConsumerRecord", "PartitionRecords", "payload", "uncompress", "use_records"]

# ConsumerRecord: the record every fmstream consumer reads (kafka-python's namedtuple: topic,
# partition, offset, timestamp, key, value, headers, ...). kafka-python defines it in its private
# fetcher module and exports it nowhere public: import it from here, never from kafka.consumer.

WRITTEN_AGAINST = "3.0.12"
"""The kafka-python release whose private fetcher this module was written against."""

USED = (
    "KafkaConsumer._fetcher",
    "Fetcher.PartitionRecords",
    "PartitionRecords.__init__(fetch_offset, tp, records, key_deserializer, value_deserializer, "
    "check_crcs, isolation_level, aborted_transactions, metric_aggregator, on_drain)",
    "PartitionRecords.take",
    "PartitionRecords.drain",
    "PartitionRecords._unpack_records(tp, records, key_deserializer, value_deserializer)",
    "PartitionRecords._consume_aborted_transactions_up_to",
    "PartitionRecords._contains_abort_marker",
    "PartitionRecords._is_batch_aborted",
    "PartitionRecords state: topic_partition, leader_epoch, next_fetch_offset, records_read, "
    "bytes_read, check_crcs, isolation_level, aborted_producer_ids",
    "DefaultRecordBatch._maybe_uncompress",
    "DefaultRecordBatch state: _buffer, _pos, _num_records",
)
"""Everything of kafka-python's fetcher this module relies on (tests/stream/test_fetcher.py
checks each on real objects)."""

RECORDS_METHODS = ("take", "drain", "_unpack_records", "_consume_aborted_transactions_up_to",
                   "_contains_abort_marker", "_is_batch_aborted")
"""The methods of ``Fetcher.PartitionRecords`` used (overridden or called)."""

RECORDS_STATE = ("topic_partition", "leader_epoch", "next_fetch_offset", "records_read",
                 "bytes_read", "check_crcs", "isolation_level", "aborted_producer_ids")
"""The instance attributes of ``Fetcher.PartitionRecords`` a subclass reads or writes."""

RECORDS_INIT = ("fetch_offset", "tp", "records", "key_deserializer", "value_deserializer",
                "check_crcs", "isolation_level", "aborted_transactions", "metric_aggregator",
                "on_drain")
"""``Fetcher.PartitionRecords.__init__``'s parameters, as the fetcher passes them."""

BATCH_STATE = ("_buffer", "_pos", "_num_records")
"""The instance attributes of a ``DefaultRecordBatch`` :func:`payload` reads."""

_Fetcher: Any = getattr(_fetcher_module, "Fetcher", None)
_KafkaRecords: Any = getattr(_Fetcher, "PartitionRecords", None)
_warned = False


def missing() -> list[str]:
    """What of :data:`USED` the installed kafka-python lacks, as far as its classes show ([]
    when all is there; instance state is checked by the tests on real objects)."""
    if not isinstance(_KafkaRecords, type):
        return ["Fetcher.PartitionRecords"]
    gone = [f"PartitionRecords.{name}" for name in RECORDS_METHODS
            if not callable(getattr(_KafkaRecords, name, None))]
    try:
        params = list(inspect.signature(_KafkaRecords.__init__).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    if params != list(RECORDS_INIT):
        gone.append("PartitionRecords.__init__(" + ", ".join(RECORDS_INIT) + ")")
    if not callable(getattr(DefaultRecordBatch, "_maybe_uncompress", None)):
        gone.append("DefaultRecordBatch._maybe_uncompress")
    return gone


_RecordsBase: Any = _KafkaRecords if isinstance(_KafkaRecords, type) else object


class PartitionRecords(_RecordsBase):
    """kafka-python's ``Fetcher.PartitionRecords`` whose parse of fetched data is a subclass's
    :meth:`unpack` (for consumers without key/value deserializers; those keep kafka-python's),
    and which drains itself when a take raises."""

    def take(self, n=None):
        try:
            return super().take(n)
        except Exception:
            # kafka-python keeps the exhausted iterator and its fetcher loops on it for good;
            # dropped, the next poll refetches from the position (and raises again, if it must)
            self.drain()
            raise

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer) -> Iterator:
        if key_deserializer is not None or value_deserializer is not None:
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        try:
            yield from self.unpack(tp, records)
        except StopIteration:  # as kafka-python: never let it end the generator silently
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def unpack(self, tp, records) -> Iterator:
        """The ``ConsumerRecord``s of ``records`` (a ``MemoryRecords``) of partition ``tp``,
        keeping ``next_fetch_offset``, ``records_read``, ``bytes_read`` and ``leader_epoch`` as
        kafka-python does, and calling ``drain()`` at the end."""
        raise NotImplementedError

    def skip_aborted(self, batch: DefaultRecordBatch) -> bool:
        """kafka-python's read_committed bookkeeping for one v2 ``batch``: True when the batch
        belongs to an aborted transaction (skip it; ``next_fetch_offset`` moves past it)."""
        if (self.isolation_level != IsolationLevel.READ_COMMITTED
                or not batch.has_producer_id()):
            return False
        self._consume_aborted_transactions_up_to(batch.last_offset)
        if self._contains_abort_marker(batch):
            self.aborted_producer_ids.discard(batch.producer_id)
            return False
        if self._is_batch_aborted(batch):
            self.next_fetch_offset = batch.next_offset
            return True
        return False


def uncompress(batch: DefaultRecordBatch) -> None:
    """Decompress a v2 ``batch`` in place (kafka-python's codecs); raises what they raise."""
    batch._maybe_uncompress()


def payload(batch: DefaultRecordBatch) -> tuple[Any, int, int]:
    """An uncompressed v2 ``batch``'s (buffer, position of its first record, record count)."""
    return batch._buffer, batch._pos, batch._num_records


def use_records(consumer: Any, records_class: type[PartitionRecords]) -> bool:
    """Make ``consumer`` (a ``KafkaConsumer``) build ``records_class`` for each fetched
    response; only this consumer changes. False (and one warning per process) when kafka-python
    no longer has what :data:`USED` names: the consumer keeps kafka-python's own parser."""
    fetcher = getattr(consumer, "_fetcher", None)
    gone = missing()
    if fetcher is None or not hasattr(fetcher, "PartitionRecords"):
        gone.insert(0, "KafkaConsumer._fetcher.PartitionRecords")
    if gone:
        global _warned
        if not _warned:
            _warned = True
            log.warning("kafka-python's fetcher lacks %s (fmstream was written against "
                        "kafka-python %s): records are parsed by kafka-python, and a batch it "
                        "cannot read stops its partition instead of being dead-lettered",
                        ", ".join(gone), WRITTEN_AGAINST)
        return False
    fetcher.PartitionRecords = records_class
    return True
