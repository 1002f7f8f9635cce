"""Prometheus metrics of the dispatcher, on a registry the caller owns (tests pass their own)."""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from dispatcher import __version__

# A `_created` series per counter and histogram doubles the series count and no panel or
# alert reads them; the switch is process-wide in prometheus_client.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

NO_POOL = "(none)"
"""The ``pool`` label of events that belong to no governed pool (foreign, malformed): pool
names are ``A-Z a-z 0-9 _ -`` only, so it cannot clash with one."""

AWS_OUTCOMES = ("ok", "expected", "throttled", "error")
"""``dispatcher_aws_calls_total`` outcomes: ``expected`` is an error answer the dispatcher
asked for and acts on (``ExecutionAlreadyExists`` for a redelivered request, ...), not a
failure."""

# Hand-over and API latencies are milliseconds to seconds; queue wait can be hours.
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0)


class Metrics:
    """Every metric the dispatcher exports; one instance per process (or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        _register_runtime(r)
        pool = ("pool",)
        self.build_info = Info("dispatcher_build", "Version of the running dispatcher.", registry=r)
        self.build_info.info({"version": __version__})
        self.limit = Gauge("dispatcher_limit", "Configured concurrency limit.", pool, registry=r)
        self.running = Gauge(
            "dispatcher_running", "Executions believed running (held slots).", pool, registry=r
        )
        self.starting = Gauge(
            "dispatcher_starting", "Requests received whose start is in flight.", pool, registry=r
        )
        self.in_doubt = Gauge(
            "dispatcher_in_doubt",
            "Starts whose outcome is unknown (answer lost): their slots stay held until a "
            "status event, a listing or a describe settles them.",
            pool,
            registry=r,
        )
        self.free = Gauge("dispatcher_free_slots", "Slots a new start may take.", pool, registry=r)
        self.queued = Gauge(
            "dispatcher_requests_queued",
            "Approximate requests waiting in the request queue (read at each reconcile).",
            pool,
            registry=r,
        )
        self.ready = Gauge(
            "dispatcher_ready", "1 once the start-up listing is done and AWS answers.", registry=r
        )
        self.starts = Counter(
            "dispatcher_starts",
            "Requests handled, by outcome (started, duplicate, retried, in_doubt, dead_lettered).",
            (*pool, "outcome"),
            registry=r,
        )
        self.dead_letters = Counter(
            "dispatcher_dead_letters",
            "Requests moved to the dead-letter queue, by reason.",
            (*pool, "reason"),
            registry=r,
        )
        self.start_latency = Histogram(
            "dispatcher_start_execution_seconds",
            "Latency of StartExecution calls.",
            pool,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "dispatcher_queue_wait_seconds",
            "Time from a request's SQS SentTimestamp to its execution being started.",
            pool,
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.refill = Histogram(
            "dispatcher_slot_refill_seconds",
            "Time from a freed slot (terminal status received) to the next StartExecution "
            "of that pool: the dispatcher's own share of a hand-over.",
            pool,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            "dispatcher_events",
            "Status-change events, by status and result (applied, duplicate, stale, foreign, "
            "malformed, ignored); pool (none) for events of no governed pool.",
            (*pool, "status", "result"),
            registry=r,
        )
        self.reconcile_runs = Counter(
            "dispatcher_reconcile_runs",
            "Reconcile passes, by result (ok, error).",
            (*pool, "result"),
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "dispatcher_reconcile_duration_seconds",
            "Duration of one reconcile pass (listing + describes).",
            pool,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.reconcile_corrections = Counter(
            "dispatcher_reconcile_corrections",
            "Drift found by reconcile, by kind (freed, adopted).",
            (*pool, "kind"),
            registry=r,
        )
        self.last_reconcile = Gauge(
            "dispatcher_last_reconcile_timestamp_seconds",
            "Unix time of the last successful reconcile.",
            pool,
            registry=r,
        )
        self.leader = Gauge(
            "dispatcher_leader",
            "1 while this process governs the pool; 0 as a standby without the lease.",
            registry=r,
        )
        self.lease_epoch = Gauge(
            "dispatcher_lease_epoch",
            "Fencing epoch of the lease this process last took (0 without a lease).",
            registry=r,
        )
        account_region = ("account", "region")
        self.start_rate = Gauge(
            "dispatcher_start_rate_limit",
            "StartExecution calls per second currently allowed for one account and region "
            "(lowered when AWS throttles, recovering gradually).",
            account_region,
            registry=r,
        )
        self.start_rate_throttles = Counter(
            "dispatcher_start_rate_throttles",
            "Throttled StartExecution calls, each of which lowered the allowed rate.",
            account_region,
            registry=r,
        )
        self.start_rate_wait = Counter(
            "dispatcher_start_rate_wait_seconds",
            "Seconds starts spent waiting for a StartExecution token.",
            account_region,
            registry=r,
        )
        self.read_budget_wait = Counter(
            "dispatcher_read_budget_wait_seconds",
            "Seconds reconcile's reads waited for the dispatcher's share of the account's "
            "ListExecutions or DescribeExecution quota.",
            ["operation", "region"],
            registry=r,
        )
        self.limit_updates = Counter(
            "dispatcher_limit_updates",
            "Live limit changes, by source (ssm, config) and result (applied, rejected).",
            (*pool, "source", "result"),
            registry=r,
        )
        self.per_key_limit = Gauge(
            "dispatcher_per_key_limit",
            "Most executions of one concurrency key running at once (0: no per-key limit).",
            pool,
            registry=r,
        )
        self.waiting = Gauge(
            "dispatcher_requests_waiting",
            "Requests received and held in memory (visibility extended) until their key, "
            "priority or a slot lets them start.",
            pool,
            registry=r,
        )
        self.callbacks = Counter(
            "dispatcher_callbacks",
            "Answers to parents' task tokens, by outcome (success, failure, parent_gone, "
            "error: not answered yet, tried again).",
            (*pool, "outcome"),
            registry=r,
        )
        self.tokens_held = Gauge(
            "dispatcher_tokens_held",
            "Task tokens the dispatcher holds: child running, or request waiting in memory.",
            pool,
            registry=r,
        )
        self.heartbeats = Counter(
            "dispatcher_heartbeats",
            "SendTaskHeartbeat calls, by outcome (ok, parent_gone, error).",
            (*pool, "outcome"),
            registry=r,
        )
        self.orphans = Counter(
            "dispatcher_orphaned_children",
            "Children whose parent stopped waiting, by what was done (stopped, left, dropped: "
            "never started).",
            (*pool, "action"),
            registry=r,
        )
        self.deferred = Counter(
            "dispatcher_requests_deferred",
            "Requests handed back to their queue for later because the pool's in-memory "
            "buffer (or that key's share of it) was full.",
            pool,
            registry=r,
        )
        self.former_names = Counter(
            "dispatcher_former_name_lookups",
            "Requests received before this process governed the pool, looked for under the "
            "names a former configuration gave them, by result (found, not_found, failed).",
            (*pool, "result"),
            registry=r,
        )
        self.former_name_describes = Counter(
            "dispatcher_former_name_describes",
            "DescribeExecution calls made to look for requests under former names.",
            pool,
            registry=r,
        )
        named = ("limit",)
        self.shared_limit = Gauge(
            "dispatcher_shared_limit",
            "Value in force of a named limit shared by pools.",
            named,
            registry=r,
        )
        self.shared_limit_in_use = Gauge(
            "dispatcher_shared_limit_in_use",
            "Units of a named limit held: each user pool's running, starting and in-doubt "
            "executions times its weight.",
            named,
            registry=r,
        )
        self.shared_limit_waiting = Gauge(
            "dispatcher_shared_limit_waiting",
            "Requests waiting in the rooms of pools held back by a named limit (waiting for "
            "units, or blocked by it).",
            named,
            registry=r,
        )
        self.shared_limit_blocked = Gauge(
            "dispatcher_shared_limit_blocked",
            "1 while a pool cannot start at all under a named limit: its weight is above the "
            "value in force (not counting a pause, limit 0).",
            (*named, "pool"),
            registry=r,
        )
        self.aws_calls = Counter(
            "dispatcher_aws_calls",
            "AWS API calls (HTTP attempts), by operation and outcome (ok; expected: an error "
            "answer the dispatcher acts on, such as ExecutionAlreadyExists; throttled; error).",
            ("operation", "outcome"),
            registry=r,
        )

    def _prefill_callbacks(self, pool: str) -> None:
        for outcome in ("success", "failure", "parent_gone", "error"):
            self.callbacks.labels(pool=pool, outcome=outcome)
        self.tokens_held.labels(pool=pool)
        for action in ("stopped", "left", "dropped"):
            self.orphans.labels(pool=pool, action=action)
        for outcome in ("ok", "parent_gone", "error"):
            self.heartbeats.labels(pool=pool, outcome=outcome)

    def prefill(self, pool: str) -> None:
        """Export every known label set at zero, so dashboards and alerts see 0, not "no data"."""
        for outcome in ("started", "duplicate", "retried", "in_doubt", "dead_lettered"):
            self.starts.labels(pool=pool, outcome=outcome)
        self._prefill_callbacks(pool)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(pool=pool, reason=reason)
        for kind in ("adopted", "freed"):
            self.reconcile_corrections.labels(pool=pool, kind=kind)
        for result in ("found", "not_found", "failed"):
            self.former_names.labels(pool=pool, result=result)
        self.former_name_describes.labels(pool=pool)
        for status in ("RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"):
            for result in ("applied", "duplicate", "stale"):
                self.events.labels(pool=pool, status=status, result=result)
        self.events.labels(pool=NO_POOL, status="unknown", result="malformed")
        for operation in (
            "StartExecution",
            "ReceiveMessage",
            "ListExecutions",
            "DescribeExecution",
        ):
            for outcome in AWS_OUTCOMES:
                self.aws_calls.labels(operation=operation, outcome=outcome)
        for result in ("ok", "error"):
            self.reconcile_runs.labels(pool=pool, result=result)
        self.reconcile_duration.labels(pool=pool)
        for source in ("ssm", "config"):
            for result in ("applied", "rejected"):
                self.limit_updates.labels(pool=pool, source=source, result=result)
        self.deferred.labels(pool=pool)
        for histogram in (self.start_latency, self.queue_wait, self.refill):
            histogram.labels(pool=pool)


def _register_runtime(registry: CollectorRegistry) -> None:
    """Export ``process_*`` and ``python_*`` (CPU, memory, open files, GC) on ``registry``.

    On the global registry prometheus_client has registered them already."""
    if registry is REGISTRY:
        return
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


DEAD_LETTER_REASONS = (
    "invalid_json",
    "input_too_large",
    "invalid_idempotency_key",
    "idempotency_conflict",
    "receive_limit",
    "expired",
    "invalid_start_by",
    "unknown_pool",
    "InvalidExecutionInput",
    "InvalidName",
    "ValidationException",
)
"""Reasons known in advance (others, from AWS error codes, appear when they happen)."""
