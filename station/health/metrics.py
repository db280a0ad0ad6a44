"""Prometheus metrics on `[metrics] listen`, with prometheus_client, from the station's events.

Why it looks like this:
- Metrics are one more consumer of the bus, a display: called on the loop for every
  event (Progress included, for the bytes flashed), it only bumps counters in memory and
  never blocks or raises into a board. prometheus_client's HTTP server answers scrapes
  from its own thread.
- Names and labels follow Prometheus' conventions: units in the name (`_seconds`,
  `_bytes`, `_total` for counters), and only bounded label sets: result, stage, slot
  (the operator's labels, one per socket), AWS API name. Never a MAC or a job id: one
  series per board would grow without end; a board's story is in the ledger.
- Some figures are read at scrape time instead of pushed: AWS calls and throttles (the
  IoT client already counts them), the central ledger's lag (the replicator's status),
  and the process's RSS and CPU (prometheus_client's ProcessCollector).
- Counters start at zero with each process, as Prometheus expects (`rate()` and
  `increase()` handle restarts); the ledger is the record that survives them.
- A registry of its own, not the global default: tests build several stations in one
  process, and nothing else of the process leaks into the station's endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from station.errors import ConfigError
from station.events import (
    Event,
    JobFinished,
    JobStarted,
    Progress,
    Retrying,
    Stage,
    Throttled,
)
from station.fleet import ReplicationStatus

log = logging.getLogger("station.metrics")

STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
BOARD_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

STAGES = frozenset(s.value for s in Stage)

AwsCounts = Callable[[], tuple[Mapping[str, int], Mapping[str, int]]]
"""() -> (calls by API, throttles by API)."""


class StationMetrics:
    """The station's metrics; `show` is the bus display, `serve` the HTTP endpoint."""

    def __init__(self, *, replication: Callable[[], ReplicationStatus] | None = None,
                 aws: AwsCounts | None = None, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.boards = Counter("station_boards", "Boards that reached a final stage, by "
                              "result and (for failed or removed) the stage it ended in",
                              ["result", "failed_stage"], registry=r)
        self.stage_seconds = Histogram("station_stage_duration_seconds", "Seconds a board "
                                       "spent in each stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.board_seconds = Histogram("station_board_duration_seconds", "Seconds from plug "
                                       "to final stage, by result", ["result"],
                                       buckets=BOARD_BUCKETS, registry=r)
        self.flashed = Counter("station_flashed_bytes", "Bytes written to boards' flash",
                               registry=r)
        self.in_flight = Gauge("station_boards_in_flight", "Boards being worked on now",
                               registry=r)
        self.retries = Counter("station_retries", "Stage retries, by stage", ["stage"],
                               registry=r)
        self.registrar_errors = Counter("station_registrar_errors", "Registration attempts "
                                        "that failed (retried or final)", registry=r)
        self.slot_failures = Counter("station_slot_failures", "Boards failed on each slot",
                                     ["slot"], registry=r)
        self.slot_streak = Gauge("station_slot_consecutive_failures", "Boards failed in a "
                                 "row on each slot (0 after a done board)", ["slot"],
                                 registry=r)
        self.last_done = Gauge("station_last_board_done_timestamp_seconds", "When the last "
                               "board was done, or the station started (Unix time)",
                               registry=r)
        self.ledger_write = Histogram("station_ledger_write_seconds", "Seconds from an event "
                                      "to its durable ledger commit", buckets=WRITE_BUCKETS,
                                      registry=r)
        self.started = Gauge("station_start_timestamp_seconds", "When this station process "
                             "started (Unix time)", registry=r)
        self.started.set(time.time())
        self.last_done.set(time.time())  # "nothing done for 10 min" counts from the start
        if process:
            ProcessCollector(registry=r)  # process_resident_memory_bytes, ..._cpu_seconds
        r.register(_PulledMetrics(replication, aws))
        self._jobs: dict[str, dict[str, int]] = {}  # job -> bytes written per region
        self._started: dict[str, float] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- the bus display ---------------------------------------------------------------

    def show(self, event: Event) -> None:
        if isinstance(event, Progress):
            regions = self._jobs.setdefault(event.job_id, {})
            before = regions.get(event.region, 0)
            self.flashed.inc(max(0, event.done - before) if event.done >= before
                             else event.done)
            regions[event.region] = event.done
            return
        if not isinstance(event, Throttled):  # notified only: never journaled
            self.ledger_write.observe(max(0.0, time.time() - event.at))
        if isinstance(event, JobStarted):
            self._jobs[event.job_id] = {}
            self._started[event.job_id] = event.at
            self.in_flight.inc()
        elif isinstance(event, Retrying):
            self.retries.labels(event.stage.value).inc()
            self._jobs[event.job_id] = {}  # a retry writes its regions again from 0
            if event.stage == Stage.REGISTER:
                self.registrar_errors.inc()
        elif isinstance(event, JobFinished):
            self._finished(event)

    def _finished(self, event: JobFinished) -> None:
        if self._jobs.pop(event.job_id, None) is not None:
            self.in_flight.dec()
        failed = event.failed_stage.value if event.failed_stage else ""
        self.boards.labels(event.result.value, failed).inc()
        for stage, seconds in event.timings.items():
            if stage in STAGES:  # not "register_cloud", which overlaps the flash
                self.stage_seconds.labels(stage).observe(seconds)
        started = self._started.pop(event.job_id, None)
        if started is not None:
            self.board_seconds.labels(event.result.value).observe(max(0.0, event.at - started))
        if event.result == Stage.FAILED:
            self.slot_failures.labels(event.slot).inc()
            self.slot_streak.labels(event.slot).inc()
            if event.failed_stage == Stage.REGISTER:
                self.registrar_errors.inc()
        elif event.result == Stage.DONE:
            self.slot_streak.labels(event.slot).set(0)
            self.last_done.set(event.at)

    # -- the endpoint ------------------------------------------------------------------

    def serve(self, listen: str, address: tuple[str, int], config_path: str) -> None:
        """Start the HTTP endpoint; ConfigError naming [metrics] listen if it cannot bind."""
        from prometheus_client import start_http_server

        host, port = address
        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=self.registry)
        except OSError as e:
            raise ConfigError(config_path, "metrics.listen", f"cannot listen on {listen}: "
                              f"{e.strerror or e}") from None
        log.info("metrics on http://%s/metrics", listen)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _PulledMetrics(Collector):
    """Figures read at scrape time from their owners (AWS client, replicator)."""

    def __init__(self, replication: Callable[[], ReplicationStatus] | None,
                 aws: AwsCounts | None) -> None:
        self.replication = replication
        self.aws = aws

    def describe(self) -> list[Any]:
        return []  # unchecked: the families depend on what is configured

    def collect(self) -> Iterator[Any]:
        if self.aws is not None:
            calls, throttles = self.aws()
            c = CounterMetricFamily("station_aws_calls", "AWS IoT API calls, by API",
                                    labels=["api"])
            for api, n in sorted(calls.items()):
                c.add_metric([api], n)
            yield c
            t = CounterMetricFamily("station_aws_throttles", "AWS IoT calls throttled "
                                    "(by AWS or the station's own rate limiter), by API",
                                    labels=["api"])
            for api, n in sorted(throttles.items()):
                t.add_metric([api], n)
            yield t
        if self.replication is not None:
            s = self.replication()
            yield GaugeMetricFamily("station_central_up", "1 if the central ledger "
                                    "(PostgreSQL) is reachable and accepts the station",
                                    value=1 if s.state == "up" else 0)
            yield GaugeMetricFamily("station_central_lag_seconds", "Age of the oldest "
                                    "ledger event not yet in the central ledger",
                                    value=s.lag_s)
            yield GaugeMetricFamily("station_central_pending_events", "Ledger events not "
                                    "yet in the central ledger", value=s.pending)
            yield CounterMetricFamily("station_central_shipped_events", "Ledger events "
                                      "shipped to the central ledger by this process",
                                      value=s.shipped)
