"""Scenario 5: one big tenant does not starve ten small ones, with per-key limits.

One key ("big") sends 1,000 requests, then ten keys ("small-0".."small-9") send 10 each,
all before the dispatcher starts: the worst case for plain FIFO. Each execution waits a
fixed time. The same requests run against a fresh emulator three ways: no key attribute
(FIFO), the key attribute only (round-robin by key), and the key attribute with a per-key
limit. Every figure comes from the executions' records; only the deferral count is the
dispatcher's own (``dispatcher_requests_deferred_total``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from bench import prom
from bench.analysis import busy_slot_seconds, percentile
from bench.aws import session
from bench.child import Child, dispatcher_child
from bench.proc import LoadMeter
from devtools.records import Execution, concurrency_series, list_executions, max_overlap
from devtools.sandbox import Emulator, SandboxResources, provision
from dispatcher.core.requests import KEY_TAG_LENGTH, key_tag, tag_of
from dispatcher.producer import SubmitItem, submit_requests

BIG = "big"
ATTRIBUTE = "tenant"
DEFERRED = "dispatcher_requests_deferred_total"


@dataclass(frozen=True)
class Config:
    """The fairness run's sizes."""

    big: int = 1000
    small_tenants: int = 10
    small: int = 10  # requests per small tenant
    seconds: float = 1.0  # every execution waits this long
    limit: int = 20
    per_key_limit: int = 5
    round_robin_only: bool = True  # also run with the key attribute but no per-key limit
    within: float = 600.0  # stop a run after this long and report what ended


@dataclass(frozen=True)
class Variant:
    """One way of running the same requests."""

    name: str
    label: str
    key_attribute: str | None
    per_key_limit: int | None

    def settings(self, cfg: Config) -> dict[str, object]:
        """The dispatcher's settings (field -> value) for this variant."""
        out: dict[str, object] = {"limit": cfg.limit}
        if self.key_attribute is not None:
            out["key_attribute"] = self.key_attribute
        if self.per_key_limit is not None:
            out["per_key_limit"] = self.per_key_limit
        return out


def variants(cfg: Config) -> list[Variant]:
    """FIFO, (round-robin only,) and per-key limits, in the order they are shown."""
    out = [Variant("fifo", "no key attribute (FIFO)", None, None)]
    if cfg.round_robin_only:
        out.append(Variant("round-robin", f"key {ATTRIBUTE}, no per-key limit", ATTRIBUTE, None))
    out.append(
        Variant(
            "per-key",
            f"key {ATTRIBUTE}, per-key limit {cfg.per_key_limit}",
            ATTRIBUTE,
            cfg.per_key_limit,
        )
    )
    return out


def tenants(cfg: Config) -> list[str]:
    """Every tenant, big first (the order they are enqueued in)."""
    return [BIG, *(f"small-{i}" for i in range(cfg.small_tenants))]


def requests(cfg: Config) -> Iterator[tuple[str, str]]:
    """(tenant, idempotency key) of every request, in the order they are sent."""
    for tenant in tenants(cfg):
        for i in range(cfg.big if tenant == BIG else cfg.small):
            yield tenant, f"{tenant}-{i:04d}"


def tenant_of(name: str, by_tag: Mapping[str, str]) -> str | None:
    """The tenant of an execution: from its key tag when it has one, else from its name.

    A tagged name whose tag and idempotency key disagree gives None (counted as a fault).
    """
    tag = tag_of(name)
    if tag is None:
        return name.rsplit("-", 1)[0]
    tenant = by_tag.get(tag)
    return tenant if tenant == name[KEY_TAG_LENGTH:].rsplit("-", 1)[0] else None


def _relative(series: Sequence[tuple[float, int]], origin: float) -> list[list[float]]:
    return [[round(at - origin, 3), running] for at, running in series]


def figures(executions: Sequence[Execution], tenant_names: Sequence[str]) -> dict[str, Any]:
    """Finish times per tenant, peak concurrency overall and per key, from the records.

    Times are seconds after the first execution started; an execution still running
    counts as running until the last stop seen.
    """
    if not executions:
        return {"executions": 0}
    by_tag = {key_tag(t): t for t in tenant_names}
    origin = min(e.start for e in executions)
    end = max((e.stop for e in executions if e.stop is not None), default=origin)
    by_tenant: dict[str, list[Execution]] = {t: [] for t in tenant_names}
    unknown = 0
    for e in executions:
        tenant = tenant_of(e.name, by_tag)
        if tenant in by_tenant:
            by_tenant[tenant].append(e)
        else:
            unknown += 1
    per_tenant = {
        t: {
            "executions": len(runs),
            "ended": sum(1 for e in runs if e.stop is not None),
            "first_start": round(min(e.start for e in runs) - origin, 3),
            "finished": round(max(e.stop or end for e in runs) - origin, 3),
            "peak": max_overlap(runs, now=end),
        }
        for t, runs in by_tenant.items()
        if runs
    }
    small = [t for t in tenant_names if t != BIG and t in per_tenant]
    small_done = [per_tenant[t]["finished"] for t in small]
    last_small = max(small_done, default=0.0)
    big_runs = by_tenant.get(BIG, [])
    small_runs = [e for t in small for e in by_tenant[t]]
    return {
        "executions": len(executions),
        "still_running": sum(1 for e in executions if e.stop is None),
        "failed": sum(1 for e in executions if e.status not in ("SUCCEEDED", "RUNNING")),
        "unknown_tenant": unknown,
        "small_finished": {
            "min": round(min(small_done, default=0.0), 3),
            "median": round(percentile(small_done, 50), 3) if small_done else None,
            "max": round(last_small, 3),
        },
        "big_finished": per_tenant.get(BIG, {}).get("finished"),
        "big_finished_before_last_small": sum(
            1 for e in big_runs if e.stop is not None and e.stop - origin <= last_small
        ),
        "peak_concurrency": max_overlap(executions, now=end),
        "peak_per_key": max((p["peak"] for p in per_tenant.values()), default=0),
        "peak_small_key": max((per_tenant[t]["peak"] for t in small), default=0),
        "wall_seconds": round(end - origin, 3),
        "tenants": per_tenant,
        "series": {
            "big": _relative(concurrency_series(big_runs, now=end), origin),
            "small": _relative(concurrency_series(small_runs, now=end), origin),
        },
    }


async def _enqueue(resources: SandboxResources, cfg: Config) -> int:
    """Send every request, the big tenant's first, each carrying its tenant attribute."""
    body = f'{{"seconds": {cfg.seconds:g}}}'
    sent = 0
    for tenant in tenants(cfg):
        # One tenant at a time: the batches of one submission go out concurrently.
        items = [
            SubmitItem(body, idempotency_key=key, attributes={ATTRIBUTE: tenant})
            for t, key in requests(cfg)
            if t == tenant
        ]
        report = await submit_requests(
            resources.request_queue_url, items, endpoint_url=resources.endpoint, concurrency=8
        )
        if not report.ok:
            raise RuntimeError(f"submitting {tenant}'s requests failed: {report.summary()}")
        sent += len(items)
    return sent


async def _until_done(child: Child, count: int, within: float) -> bool:
    """Wait until every request has ended or been dead-lettered; False on time-out."""
    with anyio.move_on_after(within):
        # Polling the child's /status: the only way to watch another process.
        while True:
            status = await child.status()
            if status["finished"] + (status["intake"] or {}).get("dead_lettered", 0) >= count:
                return True
            await anyio.sleep(0.5)
    return False


async def _depth(resources: SandboxResources, url: str) -> int:
    """Messages in a queue, visible or not."""
    async with session().client("sqs", endpoint_url=resources.endpoint) as sqs:
        attrs = await sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    return sum(int(v) for v in attrs["Attributes"].values())


async def run_variant(cfg: Config, variant: Variant) -> dict[str, Any]:
    """The requests against a fresh emulator and dispatcher child, judged from the records."""
    print(f"[bench] fairness: {variant.label}")
    async with Emulator() as emulator:
        assert emulator.pid is not None
        meter = LoadMeter()
        meter.track(emulator.pid)
        resources = await provision(
            emulator.endpoint,
            prefix=f"fair-{variant.name}",
            limit=cfg.limit,
            max_receive_count=100,  # each hand-back of a deferred request is a receive
        )
        count = await _enqueue(resources, cfg)
        async with dispatcher_child(resources, variant.settings(cfg)) as child:
            meter.track(child.pid)
            began = time.monotonic()
            complete = await _until_done(child, count, cfg.within)
            seconds = time.monotonic() - began
            samples = await child.metrics()
            child_cpu = child.sample().cpu_seconds
        async with session().client("stepfunctions", endpoint_url=emulator.endpoint) as sfn:
            executions = await list_executions(sfn, resources.state_machine_arn)
        dead = await _depth(resources, resources.dead_letter_queue_url)
        left = await _depth(resources, resources.request_queue_url)
        load = meter.stop({child.pid: child_cpu})
    calls = prom.by_label(samples, "dispatcher_aws_calls_total", "operation")
    return {
        "label": variant.label,
        "settings": variant.settings(cfg),
        "requests": count,
        "complete": complete and len(executions) == count,
        "seconds_ready_to_done": round(seconds, 1),
        "deferred": int(prom.total(samples, DEFERRED)),
        "dead_lettered": dead,
        "left_in_queue": left,
        "api_calls": dict(sorted(calls.items())),
        **figures(executions, tenants(cfg)),
        "load": asdict(load) | {"others_busy_cores": round(load.others_busy_cores, 3)},
    }


async def run(cfg: Config) -> dict[str, Any]:
    """Every variant, one after the other."""
    print(
        f"[bench] fairness: {cfg.big} requests of {BIG}, then {cfg.small_tenants} x "
        f"{cfg.small}, {cfg.seconds:g} s each, limit {cfg.limit}"
    )
    runs = {v.name: await run_variant(cfg, v) for v in variants(cfg)}
    return {"config": asdict(cfg), "runs": runs}


def _num(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _row(r: dict[str, Any], cfg: dict[str, Any]) -> str:
    """One run's table row; a tenant group not done says how far it got."""
    ended = {t: v["ended"] for t, v in r["tenants"].items()}
    big_ended = ended.get(BIG, 0)
    big = (
        _num(r["big_finished"])
        if big_ended == cfg["big"]
        else f"not done: {big_ended:,} of {cfg['big']:,} ended"
    )
    small_total = cfg["small_tenants"] * cfg["small"]
    small_ended = sum(n for t, n in ended.items() if t != BIG)
    s = r["small_finished"]
    small = f"{_num(s['min'])} / {_num(s['median'])} / {_num(s['max'])}" + (
        "" if small_ended == small_total else f" ({small_ended} of {small_total} ended)"
    )
    stopped = "" if r["complete"] else " (**stopped**)"
    wall = (
        _num(r["wall_seconds"])
        if r["complete"]
        else f"stopped after {r['seconds_ready_to_done']:,.0f}"
    )
    return (
        f"| {r['label']}{stopped} | {small} | {big} | {r['peak_concurrency']} | "
        f"{r['peak_per_key']} ({r['peak_small_key']}) | {wall} | {r['deferred']:,} | "
        f"{r['dead_lettered']} |"
    )


def _utilisation(r: dict[str, Any], limit: int) -> float:
    """Execution-seconds over limit x wall time, from the stored series."""
    wall = r["wall_seconds"]
    busy = sum(
        busy_slot_seconds([(at, n) for at, n in r["series"][group]], limit, 0.0, wall)
        for group in ("big", "small")
    )
    return busy / (limit * wall) if wall > 0 else 0.0


def _big_rate(r: dict[str, Any], cfg: dict[str, Any]) -> str:
    """How fast the big tenant's executions ended, against what its per-key limit allows."""
    big = r["tenants"].get(BIG)
    if not big or big["finished"] <= 0:
        return "the big tenant ended none"
    text = (
        f"the big tenant ended {big['ended']:,} executions at "
        f"{big['ended'] / big['finished']:.2f}/s"
    )
    per_key = r["settings"].get("per_key_limit")
    if per_key:
        text += f" (its per-key limit allows {per_key / cfg['seconds']:g}/s)"
    return text


def section(doc: dict[str, Any]) -> list[str]:
    """The summary's Fairness section: one row per run."""
    cfg, runs = doc["results"]["config"], doc["results"]["runs"]
    work = cfg["big"] + cfg["small_tenants"] * cfg["small"]
    lines = [
        "## Fairness",
        "",
        f"{cfg['big']:,} requests of tenant `{BIG}`, then {cfg['small_tenants']} tenants "
        f"(`small-0`..) with {cfg['small']} each, all enqueued before the dispatcher starts "
        f"({BIG} first: the worst case for FIFO); every execution waits {cfg['seconds']:g} s; "
        f"limit {cfg['limit']}. Each run has its own emulator and dispatcher (child process). "
        "Times are seconds after the first execution started, from the executions' records; "
        f"at limit {cfg['limit']} the {work:,} executions need at least "
        f"{work * cfg['seconds'] / cfg['limit']:,.0f} s, and at per-key limit "
        f"{cfg['per_key_limit']} the big tenant alone at least "
        f"{cfg['big'] * cfg['seconds'] / cfg['per_key_limit']:,.0f} s.",
        "",
        "| run | small tenants finished (s): min / median / max | big tenant finished (s) | "
        "peak concurrency | peak per key (small keys) | wall time (s) | deferred | "
        "dead-lettered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [*(_row(r, cfg) for r in runs.values()), ""]
    if not all(r["complete"] for r in runs.values()):
        lines += [
            f"A run marked **stopped** had not ended every request after {cfg['within']:,.0f} "
            "s, the time budget per run: the dispatcher was stopped there and the figures are "
            "for the executions that had ended (a tenant's finish time only once all of its "
            "requests had).",
            "",
        ]
    lines += [
        "![running executions per tenant group](fairness.png)",
        "",
        "*Deferred* is the dispatcher's `dispatcher_requests_deferred_total`: requests "
        "handed back to the queue (hidden until about when the requests ahead of them "
        "will have started) because their key's share of the waiting room was full; each "
        "hand-back costs a receive more.",
        "",
    ]
    for r in runs.values():
        lines.append(
            f"- **{r['label']}**: {r['big_finished_before_last_small']:,} of the big tenant's "
            f"executions had finished when the last small tenant finished; slots busy "
            f"{_utilisation(r, cfg['limit']):.0%} of the wall time; {_big_rate(r, cfg)}; "
            f"{r['seconds_ready_to_done']:,.0f} s from ready to "
            f"{'the last end' if r['complete'] else 'the stop'}; calls: "
            + ", ".join(f"{k} {v:,}" for k, v in r["api_calls"].items())
            + f"; other processes used {r['load']['others_busy_cores']:.2f} cores."
        )
    return [
        *lines,
        "",
        f"Reproduce: `make bench` (all scenarios) or `.venv/bin/python -m bench --only "
        f"fairness`; uptime before: `{doc['uptime_before']}`; after: `{doc['uptime_after']}`.",
        "",
    ]
