"""Wiring: builds the trainer (with its publisher) and the serving worker from one Settings."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import sys
import threading

import redis

from fmstream.errors import PriorityError
from fmstream.settings import Settings
from model.online import OnlineFM, TrainConfig
from model.schema import FeatureSchema

log = logging.getLogger(__name__)


def configure_threads(settings: Settings) -> None:
    """One intra-op thread per process by default: two fought each other on 2 cores.

    torch and faiss get their own calls; every BLAS and OpenMP pool loaded in the process
    (numpy's OpenBLAS, faiss' OpenBLAS, both libgomps) is limited too through threadpoolctl:
    numpy's OpenBLAS otherwise ran 2 threads whose spinning cost the trainer ~35 us CPU per
    event (bench/ingest.py, "other threads").
    """
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(settings.threads)
    faiss.omp_set_num_threads(settings.threads)
    threadpool_limits(settings.threads)


def configure_thread(settings: Settings) -> None:
    """:func:`configure_threads` for a thread started later. OpenMP's thread count is a
    per-thread setting (``omp_set_num_threads`` sets the calling thread's), so a thread that
    searches with faiss (the trainer's publisher thread: offline i2i) sets its own, or faiss
    runs its searches with one OpenMP thread per core: in the 1M e2e a second OpenMP thread
    spun beside the publisher's i2i searches (publisher process CPU 159 -> 135 ms a second with
    one thread, 100k users x 100k items; bench/RESULTS.md 'tail', 12-01)."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(settings.threads)
    threadpool_limits(settings.threads, user_api="openmp")


def lower_priority(nice: int) -> int:
    """Add ``nice`` to this process's niceness (``FMSTREAM_TRAINER_NICE``); returns the niceness
    now in force. Children started afterwards (the fetch process, checkpoint writers) inherit it.

    Only lowers: a process may not raise its own priority without privileges. Niceness orders
    processes that compete for a core inside one scheduling group (a session with
    autogroup, a cgroup): containers with their own cgroup are weighed by the cgroup's
    ``cpu.weight`` instead, where this has no effect.
    """
    if nice < 0:
        raise PriorityError(f"nice must be >= 0 (only lowering is allowed), got {nice}: set "
                            "FMSTREAM_TRAINER_NICE to 0 or more")
    if nice == 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    now = os.nice(nice)
    log.info("running at niceness %d (FMSTREAM_TRAINER_NICE=%d): serving workers, Redis "
             "and the broker on this host get a core first", now, nice)
    return now


SYS_SCHED_ATTR = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""``sched_setattr`` / ``sched_getattr`` syscall numbers (glibc wraps neither)."""
SLICE_MIN_US, SLICE_MAX_US = 100, 100_000
"""The custom slices Linux accepts for a normal (EEVDF) task."""


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (include/uapi/linux/sched/types.h), version 1 (56 bytes)."""

    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32),
                ("flags", ctypes.c_uint64), ("nice", ctypes.c_int32),
                ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64),
                ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32)]


def thread_slice_us(tid: int = 0) -> int | None:
    """The scheduler slice in microseconds of thread ``tid`` (0: the calling thread) as the
    kernel reports it (its ``sched_runtime``), or None where it cannot be read (not Linux
    x86_64/aarch64, no such thread)."""
    numbers = SYS_SCHED_ATTR.get(platform.machine())
    if sys.platform != "linux" or numbers is None:
        return None
    attr = _SchedAttr()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers[1], tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        return None
    return int(attr.runtime) // 1000


def request_slice(us: int) -> bool:
    """Ask the scheduler for time slices of ``us`` microseconds for the calling thread and the
    threads it starts afterwards (``FMSTREAM_WORKER_SLICE_US``); True when in force.

    Linux >= 6.12 (EEVDF) takes a normal task's ``sched_runtime`` as its slice: a shorter one
    gives the task an earlier virtual deadline, so a worker thread woken by a request gets a
    core before a thread of the trainer that is mid-slice, while over time each still gets
    the CPU share its niceness gives (no privileges needed: it is not a priority). Elsewhere
    (an older kernel that ignores it, not Linux) it logs why and changes nothing. Threads
    inherit the slice: call before the worker's threads start.

    Raises:
        PriorityError: ``us`` neither 0 nor within the kernel's range (a ``ValueError``).
    """
    if us == 0:
        return False
    if not SLICE_MIN_US <= us <= SLICE_MAX_US:
        raise PriorityError(f"slice must be 0 (the kernel's default) or {SLICE_MIN_US}.."
                            f"{SLICE_MAX_US} us, got {us}: set FMSTREAM_WORKER_SLICE_US in range")
    numbers = SYS_SCHED_ATTR.get(platform.machine())
    if sys.platform != "linux" or numbers is None:
        log.warning("FMSTREAM_WORKER_SLICE_US=%d ignored: sched_setattr needs Linux on "
                    "x86_64/aarch64 (here %s %s)", us, sys.platform, platform.machine())
        return False
    libc = ctypes.CDLL(None, use_errno=True)

    def set_slice(tid: int) -> int:
        attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), policy=os.SCHED_OTHER,
                          nice=os.getpriority(os.PRIO_PROCESS, tid), runtime=us * 1000)
        return 0 if libc.syscall(numbers[0], tid, ctypes.byref(attr), 0) == 0 else (
            ctypes.get_errno())

    err = set_slice(0)
    if err:
        log.warning("FMSTREAM_WORKER_SLICE_US=%d not in force: sched_setattr failed (%s)",
                    us, os.strerror(err))
        return False
    if thread_slice_us() != us:  # kernels before 6.12 accept the call and ignore the slice
        log.warning("FMSTREAM_WORKER_SLICE_US=%d not in force: this kernel (%s) ignores "
                    "custom slices (Linux >= 6.12 takes them)", us, platform.release())
        return False
    # threads started before (a BLAS pool at import): the same slice; later ones inherit it
    me = threading.get_native_id()
    for tid in (int(t) for t in os.listdir("/proc/self/task") if int(t) != me):
        if set_slice(tid) not in (0, errno.ESRCH):  # ESRCH: the thread ended meanwhile
            log.warning("thread %d keeps the kernel's slice (sched_setattr refused)", tid)
    log.info("scheduler slice %d us for the serving threads (FMSTREAM_WORKER_SLICE_US)", us)
    return True


def feature_schema(settings: Settings) -> FeatureSchema:
    """The schema file named by the settings, or ids only."""
    if settings.schema_path is None:
        return FeatureSchema.ids_only()
    return FeatureSchema.load(settings.schema_path)


def train_config(settings: Settings) -> TrainConfig:
    return TrainConfig(
        dim=settings.dim, lr=settings.lr, l2=settings.l2, loss=settings.loss,
        negatives=settings.negatives, neg_sampling=settings.neg_sampling,
        neg_alpha=settings.neg_alpha, seed=settings.seed, neg_pool=settings.neg_pool,
        acc_decay=settings.acc_decay, neg_candidates=settings.neg_candidates,
        recent_items=settings.history_len,  # serving's histories, rebuilt after Redis loss
        user_acc_decay=settings.user_acc_decay,
        neg_updates=settings.neg_updates, neg_update_by=settings.neg_update_by,
    )


def new_model(settings: Settings) -> OnlineFM:
    return OnlineFM(feature_schema(settings), train_config(settings))


REDIS_RETRIES = 1
"""Retries of a Redis command that failed on its connection (then the error is raised).

redis-py's default (10 retries, exponential backoff up to seconds) held every command ~4.7 s on a
Redis that refused connections (killed, restarting): a worker's requests waited that long for an
``internal`` error, the publisher thread for its ``GuardedSink`` to take over. One quick retry
covers a connection Redis closed (idle timeout, a restart already done); an outage is for the
callers' own handling (error responses, ``GuardedSink``, the lease keeper)."""


def redis_client(settings: Settings) -> redis.Redis:
    """The trainer's and worker's Redis client (credentials and TLS from the settings)."""
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    from stream.connect import redis_client as connect

    return connect(settings.redis_config(), socket_timeout=10, health_check_interval=10,
                   retry_on_timeout=True, retry=Retry(ConstantBackoff(0.02), REDIS_RETRIES))


def store(settings: Settings):
    """The read side of the Redis state (workers, monitoring)."""
    from serving.store import VectorStore

    return VectorStore(redis_client(settings), settings.redis_keys())


def store_writer(settings: Settings):
    """The write side of the Redis state (the trainer process)."""
    from train.store_writer import StoreWriter

    return StoreWriter(redis_client(settings), settings.redis_keys(), settings.keep_versions)


def run_trainer(
    settings: Settings, stop: threading.Event, *, idle_exit_s: float | None = None
):
    """Take the trainer lease (standby until free), then train and publish until ``stop``."""
    from stream.consume import make_dead_letter_producer
    from train.lease import Lease
    from train.loop import Trainer
    from train.metrics import serve_trainer_metrics
    from train.publish_thread import PublisherThread
    from train.publisher import Publisher
    from train.resilience import lease_client

    # Its own client with short timeouts: a hung Redis must not stall renewals past the TTL.
    lease = Lease(lease_client(settings.redis_config()), settings.redis_keys().trainer_lease())
    if not lease.acquire(stop):
        return None
    writer = store_writer(settings)
    # not idempotent, short metadata wait (make_dead_letter_producer)
    producer = make_dead_letter_producer(settings.kafka_config())
    try:
        trainer = Trainer(settings.trainer_config(), dead_letter_producer=producer, lease=lease,
                          new_model=lambda: new_model(settings))
        publisher = Publisher(settings.publish_config(), writer, trainer.model,
                              version_floor=trainer.progress.published_version,
                              model_lock=trainer.model_lock)
        background = PublisherThread(  # publishing off the training path
            publisher, on_start=lambda: configure_thread(settings)).start()
        trainer.sink = background
        try:
            with serve_trainer_metrics(settings.trainer_metrics(), settings.kafka_config(),
                                       trainer, publisher.stats):
                progress = trainer.run(stop, idle_exit_s=idle_exit_s)
        finally:
            background.close()
        try:
            publisher.publish_all()
        except redis.RedisError as exc:  # the checkpoint is written; the next trainer publishes
            log.warning("final publish skipped, Redis unavailable: %r", exc)
        return progress
    finally:
        producer.close()
        try:
            lease.release()
        except redis.RedisError as exc:  # it expires by itself after its TTL
            log.warning("could not release the trainer lease: %r", exc)


class KafkaClients:
    """The Kafka client factories of ``stream.consume`` bound to one Settings (the worker's
    ``serving.worker.KafkaClients``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def producer(self, **overrides):
        from stream.consume import make_producer

        return make_producer(self.settings.kafka_config(), **overrides)

    def consumer(self, group_id: str | None, **overrides):
        from stream.consume import make_consumer

        return make_consumer(self.settings.kafka_config(), group_id, **overrides)


def new_worker(settings: Settings, store=None, *, worker_id: str | None = None, index=None):
    """A serving worker (``serving.worker.Worker``) wired from the settings."""
    from serving.store import VectorStore
    from serving.worker import Worker

    if store is None:
        store = VectorStore(redis_client(settings), settings.redis_keys())
    return Worker(settings.serving_config(), store, KafkaClients(settings), index=index,
                  worker_id=worker_id)


def run_worker(settings: Settings, stop: threading.Event,
               ready: threading.Event | None = None) -> None:
    """Serve requests until ``stop``."""
    from serving.metrics import serve_worker_metrics

    worker = new_worker(settings)
    with serve_worker_metrics(settings.worker_metrics(), settings.kafka_config(),
                              settings.serving_group, settings.topic_requests, worker):
        worker.run(stop, ready=ready)
