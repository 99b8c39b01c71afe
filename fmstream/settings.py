"""One settings object for every fmstream command and service.

Every field reads an environment variable ``FMSTREAM_<FIELD>`` (case-insensitive), so the same
code points at a local broker started by ``fmstream up`` or at any external Kafka and Redis.
Build it once at the entry point and pass it down; nothing reads the environment at import time.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fmstream.errors import FmstreamError
from stream.config import SaslMechanism, SecurityProtocol
from stream.connect import RedisConfig, redact_url

ENV_PREFIX = "FMSTREAM_"


class UnknownSettingError(FmstreamError, ValueError):
    """An ``FMSTREAM_*`` environment variable names no setting (a typo must not fall back to a
    default such as plaintext Kafka)."""


if TYPE_CHECKING:
    from serving.config import ClientConfig, ServingConfig
    from serving.keys import RedisKeys
    from stream.config import KafkaConfig, MetricsEndpoint, Topics
    from train.config import PublishConfig, TrainerConfig


class Settings(BaseSettings):
    """Addresses, topic names, intervals and model hyper-parameters (env prefix ``FMSTREAM_``)."""

    # hide_input_in_errors: a validation error must not echo a password it was given.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    def __init__(self, **values: Any) -> None:
        check_environment(os.environ)
        super().__init__(**values)

    # --- infrastructure -------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        description="Kafka bootstrap servers (unset: `up`'s broker, 127.0.0.1:FMSTREAM_KAFKA_PORT)",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL (unset: `up`'s Redis, redis://127.0.0.1:FMSTREAM_REDIS_PORT/0)",
    )
    redis_prefix: str = Field("fm:", description="prefix of every Redis key fmstream writes")
    run_dir: Path = Field(Path(".fmstream"), description="local services' data, logs and pids")
    kafka_port: int = Field(9092, description="port of the local broker started by `up`")
    kafka_controller_port: int = Field(9093, description="KRaft controller port of `up`'s broker")
    redis_port: int = Field(6379, description="port of the local Redis started by `up`")
    redis_persistence: Literal["none", "aof"] = Field(
        "none", description="local Redis: 'none' (default: no AOF, no RDB; a restart starts "
        "empty and the publisher republishes everything from the model) or 'aof' (append-only "
        "file: a clean restart keeps the store; rewrites fork Redis; README 'Redis persistence')"
    )
    redis_aof_rewrite_min_mb: int = Field(
        2048, ge=64, description="local Redis with redis_persistence=aof: no automatic AOF "
        "rewrite before the file reaches this size (each rewrite forks Redis and rewrites the "
        "whole data set; README)"
    )
    kafka_libs: Path = Field(
        Path("infra/kafka/target/libs"), description="folder of the Kafka jars (make kafka)"
    )
    kafka_heap: str = Field("512m", description="max heap of the local broker")

    # --- security (secure; README "Security") --------------------------------------------
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: SaslMechanism | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)"
    )
    kafka_username: str | None = Field(None, description="SASL user")
    kafka_password: SecretStr | None = Field(None, description="SASL password (secret)")
    kafka_ssl_cafile: Path | None = Field(
        None, description="PEM CA of the broker certificate (default: the system's)"
    )
    kafka_ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    kafka_ssl_keyfile: Path | None = Field(None, description="client certificate's key")
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="password of the client key (secret)"
    )
    kafka_ssl_check_hostname: bool = Field(
        True, description="the broker certificate must name the bootstrap host"
    )
    redis_username: str | None = Field(None, description="Redis ACL user (default: `default`)")
    redis_password: SecretStr | None = Field(
        None, description="Redis password (secret; overrides one in the URL)"
    )
    redis_ssl: bool = Field(False, description="TLS to Redis (same as a rediss:// URL)")
    redis_ssl_ca_file: Path | None = Field(None, description="PEM CA of the Redis certificate")
    redis_ssl_certfile: Path | None = Field(None, description="client certificate for Redis")
    redis_ssl_keyfile: Path | None = Field(None, description="client certificate's key")
    redis_ssl_check_hostname: bool = Field(
        True, description="the Redis certificate must name the host"
    )

    movielens: Path | None = Field(
        None, description="MovieLens folder the demo replays (else a synthetic stream)"
    )

    # --- topics ---------------------------------------------------------------------------
    topic_events: str = "fm.events"
    topic_users: str = "fm.users"
    topic_items: str = "fm.items"
    topic_requests: str = "fm.requests"
    topic_responses: str = "fm.responses"
    topic_dlq: str = "fm.dlq"
    partitions_events: int = Field(6, ge=1)
    partitions_requests: int = Field(6, ge=1)
    partitions_profiles: int = Field(3, ge=1)
    partitions_responses: int = Field(6, ge=1)
    partitions_dlq: int = Field(1, ge=1)
    max_message_bytes: int = Field(65536, description="larger messages are dead-lettered")

    # --- consumer groups ------------------------------------------------------------------
    trainer_group: str = "fmstream-trainer"
    serving_group: str = "fmstream-serving"

    # --- model ----------------------------------------------------------------------------
    schema_path: Path | None = Field(None, description="feature schema TOML (default: ids only)")
    dim: int = Field(32, ge=1, le=1024, description="latent factors per feature")
    lr: float = Field(0.05, gt=0, description="Adagrad learning rate")
    l2: float = Field(1e-5, ge=0, description="L2 on the rows a batch touches")
    loss: Literal["logistic", "bpr", "hinge", "softmax"] = Field(
        "softmax", description="sampled softmax (log-Q corrected) scored best on ml-100k "
        "validation (bench/quality.py)"
    )
    negatives: int = Field(512, ge=0, description="sampled negatives per positive (softmax: "
                           "per step, shared by its positives)")
    neg_sampling: Literal["uniform", "popularity"] = "popularity"
    neg_pool: int = Field(512, ge=1, description="negatives of a batch come from one pool this big")
    neg_alpha: float = Field(1.0, ge=0, description="popularity exponent of negative sampling")
    neg_candidates: int = Field(3, ge=1, description="each negative is the best-scored of this "
                                "many sampled candidates (hard negatives; model/online.py)")
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch/faiss intra-op threads per process")
    acc_decay: float = Field(1.0, gt=0, le=1, description="Adagrad accumulator decay per "
                             "update (1 = Adagrad; < 1 follows changing tastes)")
    user_acc_decay: float | None = Field(0.98, gt=0, le=1, description="acc_decay of user-side "
                                         "rows (None = acc_decay): users' tastes drift")
    step_events: int = Field(
        128, ge=1, description="events per optimiser step whatever the poll size (model/learner)"
    )
    neg_updates: int = Field(0, ge=0, description="softmax: only this many of a step's shared "
                             "negatives get item-side updates (0 = all; fewer changed item rows "
                             "per version; model/online.py TrainConfig.neg_updates)")
    neg_update_by: Literal["uniform", "mass"] = Field(
        "mass", description="how neg_updates picks them: by softmax mass (threshold sampling) "
        "or uniformly"
    )
    replay: float = Field(0.0, ge=0, description="past positives replayed per new positive")
    replay_buffer: int = Field(20_000, ge=1, description="recent positives kept for replay")
    live_sample_every: int = Field(1, ge=1, description="at most every n-th positive is scored "
                                   "before it is learned (fmstream_live_hit_rate); a sampled "
                                   "poll gives up to 64 of its positives, spread evenly")
    live_cpu_share: float = Field(0.03, gt=0, le=1, description="most of the trainer thread's "
                                  "CPU the live hit rate may take (polls beyond it not sampled)")

    # --- trainer --------------------------------------------------------------------------
    max_poll_records: int = Field(8192, ge=1, description="events per trainer poll (learned "
                                  "in steps of step_events whatever the poll size)")
    kafka_check_crcs: bool = Field(
        True, description="trainer verifies fetched batches' CRC32C (bench/ingest.py: cost)"
    )
    kafka_fast_records: bool = Field(
        True, description="trainer parses fetched v2 record batches with stream/record_parse.py "
        "(same records as kafka-python's parser, ~2x less CPU); false: kafka-python's record "
        "reader (either way an unreadable batch is dead-lettered, never retried forever)"
    )
    checkpoint_dir: Path = Field(Path(".fmstream/checkpoints"))
    checkpoint_every_events: int = Field(
        1_000_000, ge=1, description="checkpoint after this many records (or every "
        "checkpoint_every_s, whichever comes first); each periodic checkpoint forks a writer "
        "whose copy-on-write faults the trainer thread pays (bench/ingest.py)")
    checkpoint_every_s: float = Field(10.0, gt=0)
    checkpoint_background: bool = Field(
        True, description="periodic checkpoints written by a forked child (the trainer thread "
        "only forks); false: written in the trainer thread, which stops meanwhile"
    )
    history_len: int = Field(50, ge=1, description="recent items kept per user in Redis")
    # --- ops: credentials revoked while running (fmstream/credentials.py) ------------------
    credentials_check_s: float = Field(
        30.0, ge=0, description="train/serve re-check their Kafka and Redis credentials this "
        "often; refused twice in a row: stop and exit 3 (0 = off)"
    )
    trainer_metrics_port: int = Field(0, description="Prometheus port of the trainer (0 = off)")
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="the address the trainer's and the workers' "
        "/metrics bind: 127.0.0.1 = this host only; 0.0.0.0 (or ::) = every interface, for a "
        "Prometheus elsewhere (docker-compose sets it)"
    )

    # ingest (issue 10): where the trainer's work runs
    trainer_fetch_process: bool = Field(
        True, description="poll and decode Kafka in a child process (a core of its own) "
        "instead of a thread of the trainer"
    )
    trainer_fetch_depth: int = Field(
        2, ge=1, le=64, description="decoded polls the fetch process/thread keeps ready ahead "
        "of the model update (each up to max_poll_records events)"
    )
    # worker (issue 10: request p99 with versions): who gets a core first on a shared host
    trainer_nice: int = Field(
        0, ge=0, le=19, description="niceness `fmstream train` adds to itself at start (its "
        "fetch and checkpoint children inherit it): on a host shared with serving workers, "
        "Redis and the broker, they get a core before the trainer; no effect on a host of "
        "its own; 0 = none"
    )
    worker_slice_us: int = Field(
        0, ge=0, le=100_000, description="scheduler time slice `fmstream serve` asks for its "
        "threads (Linux >= 6.12 EEVDF, sched_setattr; no privileges): a slice shorter than "
        "the kernel's ~3 ms gets a waking worker thread a core sooner on a host shared with "
        "the trainer, Redis and the broker, at the same CPU share; 0 = the kernel's default"
    )

    # --- publisher ------------------------------------------------------------------------
    # 0.1 / 0.5 (and swap_poll_s 0.1): the cadences the 1M-user e2e freshness is measured at
    # (bench/scale.py --part e2e; README 'Serving: scale'); were 1.0 / 1.0 (and 0.2)
    publish_active_s: float = Field(0.1, gt=0, description="cadence of active users' records")
    publish_all_s: float = Field(
        60.0, gt=0, description="unused: user vectors are composed, no sweep (kept for configs)"
    )
    publish_items_s: float = Field(0.5, gt=0, description="cadence of item versions")
    publish_shared_s: float = Field(
        0.1, ge=0, description="cadence of versions carrying only the changed shared user rows, "
        "between item versions (moves inactive users' vectors; 0 = none). Such a version "
        "names the item version whose items it serves (item_version, README 'Versions')"
    )
    offline_i2i_s: float = Field(
        1.0, gt=0, description="cadence of incremental offline i2i refreshes"
    )
    offline_i2i_k: int = Field(20, ge=1)
    keep_versions: int = Field(
        1, ge=1, description="full item snapshots kept besides the current (and the deltas "
        "after the oldest kept)"
    )
    # deltas (issue 10 part 3-5): items ship as changed rows; full snapshots only now and then
    full_snapshot_s: float = Field(
        600.0, gt=0, description="a full item snapshot at least this often (deltas between)"
    )
    full_after_rows: float = Field(
        10.0, gt=0, description="...or once delta rows since the last reach this x the items"
    )
    full_after_bytes: float = Field(
        2.0, gt=0, description="...or once delta bytes since the last reach this x its bytes"
    )
    keep_deltas: int = Field(600, ge=1, description="most item deltas kept in Redis")
    offline_i2i_per_tick: int = Field(
        128, ge=1, description="items whose offline neighbours one publisher tick recomputes"
    )
    lost_check_s: float = Field(
        0.5, gt=0, description="how often the publisher checks Redis still holds its version"
    )
    # scale: which changed item rows ship in a version (train/deltas.py DeltaConfig)
    item_tolerance: float = Field(
        0.0, ge=0, description="an item row ships once it moved by this fraction of its "
        "shipped norm (0: every change at once, bit-exact)"
    )
    item_max_age_s: float = Field(
        5.0, ge=0, description="...and any change at the latest after this many seconds"
    )
    item_delta_form: Literal["parts", "vectors"] = Field(
        "parts", description="what an item version carries: 'parts' (changed items' own "
        "parameter rows + changed shared item rows; workers recompose) or 'vectors' (composed "
        "vectors of every item whose vector changed)"
    )

    # --- serving --------------------------------------------------------------------------
    index_kind: Literal["flat", "hnsw"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_search: int = Field(64, ge=1, description="HNSW search breadth (recall vs speed)")
    hnsw_rebuild_s: float = Field(
        300.0, gt=0, description="HNSW graph age before a background rebuild (reused meanwhile)"
    )
    max_k: int = Field(1000, ge=1)
    worker_metrics_port: int = Field(0, description="Prometheus port of a worker (0 = off)")
    swap_poll_s: float = Field(0.1, gt=0, description="how often a worker looks for a version")
    worker_session_timeout_ms: int = Field(
        10_000, ge=1000, description="a dead worker's partitions move after this long"
    )
    worker_watchdog_s: float = Field(
        45.0, ge=0,
        description="a worker not a stable group member with its partitions for this long makes "
        "a new Kafka consumer; one whose request loop is stuck in a Kafka call this long exits "
        "with status 75 for its supervisor to restart it (keep it above the 30-s rebalance "
        "timeout plus the session timeout; 0 = off)",
    )

    # --- robustness (issue 9: reply_to allow-list) ------------------------------------------
    reply_topic_prefixes: str = Field(
        "fm.replies.",
        description="comma-separated prefixes a request's reply_to may start with (besides "
        "topic_responses, always allowed); empty: only topic_responses",
    )

    @model_validator(mode="before")
    @classmethod
    def _local_addresses(cls, data: Any) -> Any:
        """Without an address of their own, the clients talk to the local services of ``up``:
        ``FMSTREAM_KAFKA_PORT=23092`` alone moves the broker and every client's bootstrap."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("kafka_bootstrap") is None:
            data["kafka_bootstrap"] = f"127.0.0.1:{data.get('kafka_port', 9092)}"
        if data.get("redis_url") is None:
            data["redis_url"] = f"redis://127.0.0.1:{data.get('redis_port', 6379)}/0"
        return data

    @model_validator(mode="after")
    def _connections_consistent(self) -> Settings:
        self.kafka_config()  # raises ValueError on a SASL setting without the rest
        return self

    @model_validator(mode="after")
    def _slice_in_range(self) -> Settings:
        if self.worker_slice_us and not 100 <= self.worker_slice_us <= 100_000:
            raise ValueError(f"worker_slice_us must be 0 (the kernel's default) or 100..100000 "
                             f"(the slices Linux accepts), got {self.worker_slice_us}")
        return self

    def __repr_args__(self):  # noqa: ANN204 - pydantic's signature
        # SecretStr fields already print as '**********'; a password in the Redis URL would not.
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "redis_url" else value)

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, in clear (for :meth:`redact`; never print them)."""
        out = [
            value.get_secret_value()
            for name in type(self).model_fields
            if isinstance(value := getattr(self, name), SecretStr)
        ]
        url_password = urlsplit(self.redis_url).password if "@" in self.redis_url else None
        if url_password:
            out.append(url_password)
        return [v for v in out if v]

    def redact(self, text: str) -> str:
        """``text`` with every secret of these settings (and URL passwords) replaced by ***."""
        for secret in sorted(self.secret_values(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return redact_urls_in(text)

    @property
    def redis_url_display(self) -> str:
        """The Redis URL without its password: what messages and the CLI show."""
        return redact_url(self.redis_url)

    def to_env(self) -> dict[str, str]:
        """These settings as ``FMSTREAM_*`` variables, to start another process with them.

        Secrets are in clear here (a child process needs them): pass the result to the process
        environment, never print it.
        """
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return out

    def redis_key(self, *parts: str | int) -> str:
        """A Redis key under this deployment's prefix, e.g. ``fm:user:196``."""
        return self.redis_keys().key(*parts)

    # --- narrow configs for the lower packages (issue 10: they never import this module) ----

    def kafka_config(self) -> KafkaConfig:
        """How every Kafka client reaches and authenticates to the brokers (TLS, SASL)."""
        from stream.config import KafkaConfig

        return KafkaConfig(
            bootstrap=self.kafka_bootstrap,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            username=self.kafka_username,
            password=self.kafka_password,
            ssl_cafile=_path(self.kafka_ssl_cafile),
            ssl_certfile=_path(self.kafka_ssl_certfile),
            ssl_keyfile=_path(self.kafka_ssl_keyfile),
            ssl_key_password=self.kafka_ssl_key_password,
            ssl_check_hostname=self.kafka_ssl_check_hostname,
        )

    def redis_config(self) -> RedisConfig:
        """How every Redis client connects (URL, ACL user, TLS)."""
        return RedisConfig(
            url=self.redis_url,
            username=self.redis_username,
            password=self.redis_password,
            ssl=self.redis_ssl,
            ssl_ca_file=_path(self.redis_ssl_ca_file),
            ssl_certfile=_path(self.redis_ssl_certfile),
            ssl_keyfile=_path(self.redis_ssl_keyfile),
            ssl_check_hostname=self.redis_ssl_check_hostname,
        )

    def topics(self) -> Topics:
        """The contract's topic names."""
        from stream.config import Topics

        return Topics(
            events=self.topic_events, users=self.topic_users, items=self.topic_items,
            requests=self.topic_requests, responses=self.topic_responses, dlq=self.topic_dlq,
        )

    def redis_keys(self) -> RedisKeys:
        """The Redis key layout under this deployment's prefix (read and write side)."""
        from serving.keys import RedisKeys

        return RedisKeys(self.redis_prefix)

    def trainer_metrics(self) -> MetricsEndpoint:
        """Where the trainer serves ``/metrics``."""
        from stream.config import MetricsEndpoint

        return MetricsEndpoint(port=self.trainer_metrics_port, host=self.metrics_host)

    def worker_metrics(self) -> MetricsEndpoint:
        """Where a worker serves ``/metrics``."""
        from stream.config import MetricsEndpoint

        return MetricsEndpoint(port=self.worker_metrics_port, host=self.metrics_host)

    def serving_config(self) -> ServingConfig:
        """What ``serving.worker.Worker`` needs."""
        from serving.config import ServingConfig

        return ServingConfig(
            topic_requests=self.topic_requests,
            topic_responses=self.topic_responses,
            topic_dlq=self.topic_dlq,
            group=self.serving_group,
            reply_prefixes=tuple(
                p.strip() for p in self.reply_topic_prefixes.split(",") if p.strip()
            ),
            input_topics=(self.topic_events, self.topic_users, self.topic_items),
            max_message_bytes=self.max_message_bytes,
            max_k=self.max_k,
            session_timeout_ms=self.worker_session_timeout_ms,
            threads=self.threads,
            index_kind=self.index_kind,
            hnsw_m=self.hnsw_m,
            hnsw_ef_search=self.hnsw_ef_search,
            hnsw_rebuild_s=self.hnsw_rebuild_s,
            swap_poll_s=self.swap_poll_s,
            watchdog_s=self.worker_watchdog_s,
        )

    def client_config(self) -> ClientConfig:
        """What ``serving.client.FmClient`` needs."""
        from serving.config import ClientConfig

        return ClientConfig(
            kafka=self.kafka_config(), topic_requests=self.topic_requests,
            topic_responses=self.topic_responses, group=self.serving_group,
        )

    def trainer_config(self) -> TrainerConfig:
        """What ``train.loop.Trainer`` needs."""
        from model.learner import LearnPolicy
        from train.config import TrainerConfig

        return TrainerConfig(
            kafka=self.kafka_config(), topics=self.topics(), group=self.trainer_group,
            checkpoint_dir=self.checkpoint_dir,
            checkpoint_every_events=self.checkpoint_every_events,
            checkpoint_every_s=self.checkpoint_every_s, max_poll_records=self.max_poll_records,
            max_message_bytes=self.max_message_bytes, check_crcs=self.kafka_check_crcs,
            fast_records=self.kafka_fast_records,
            policy=LearnPolicy(step_events=self.step_events, replay=self.replay,
                               replay_buffer=self.replay_buffer, seed=self.seed),
            live_sample_every=self.live_sample_every, live_cpu_share=self.live_cpu_share,
            fetch_process=self.trainer_fetch_process, fetch_depth=self.trainer_fetch_depth,
            checkpoint_background=self.checkpoint_background,
        )

    def publish_config(self) -> PublishConfig:
        """What ``train.publisher.Publisher`` needs."""
        from train.config import PublishConfig

        return PublishConfig(
            publish_active_s=self.publish_active_s, publish_all_s=self.publish_all_s,
            publish_items_s=self.publish_items_s, publish_shared_s=self.publish_shared_s,
            offline_i2i_s=self.offline_i2i_s,
            offline_i2i_k=self.offline_i2i_k, history_len=self.history_len,
            full_snapshot_s=self.full_snapshot_s, full_after_rows=self.full_after_rows,
            full_after_bytes=self.full_after_bytes,
            keep_deltas=self.keep_deltas, offline_i2i_per_tick=self.offline_i2i_per_tick,
            lost_check_s=self.lost_check_s, item_tolerance=self.item_tolerance,
            item_max_age_s=self.item_max_age_s, item_delta_form=self.item_delta_form,
        )

    @property
    def topic_partitions(self) -> dict[str, int]:
        """Every topic of the contract with its partition count."""
        return {
            self.topic_events: self.partitions_events,
            self.topic_users: self.partitions_profiles,
            self.topic_items: self.partitions_profiles,
            self.topic_requests: self.partitions_requests,
            self.topic_responses: self.partitions_responses,
            self.topic_dlq: self.partitions_dlq,
        }

    @property
    def compacted_topics(self) -> set[str]:
        """Profile topics are upserts keyed by id: log compaction keeps the newest."""
        return {self.topic_users, self.topic_items}


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise :class:`UnknownSettingError` for any ``FMSTREAM_*`` variable that names no setting.

    The message names the variable and the closest valid one, e.g.
    ``FMSTREAM_KAFKA_SECURITY_PROTOKOL`` -> ``FMSTREAM_KAFKA_SECURITY_PROTOCOL``.
    """
    valid = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(
        name for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in valid
    )
    if not unknown:
        return
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), sorted(valid), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see `fmstream --help` for the list"
        lines.append(f"unknown setting {name}{hint}")
    raise UnknownSettingError("\n".join(lines))


_URL_WITH_PASSWORD = re.compile(r"\b(rediss?|https?|kafka)://([^:/@\s]*):([^@\s]+)@")


def redact_urls_in(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it replaced."""
    return _URL_WITH_PASSWORD.sub(lambda m: f"{m.group(1)}://{m.group(2)}:***@", text)
