"""The tools users already have, against the same live server as the SDK
suite: Prometheus metrics read by the `prometheus_client` OpenMetrics
parser, and server-sent events read with httpx as an EventSource reads
them, resuming after `Last-Event-ID`."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families


def _headers(cfg) -> dict[str, str]:
    return {"X-API-Key": cfg.api_key} if cfg.api_key else {}


def _families(cfg) -> dict:
    r = httpx.get(f"{cfg.url}/metrics/prometheus", headers=_headers(cfg), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    # The strict OpenMetrics parser: a malformed line, a missing # EOF or a
    # sample outside its family raises.
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _scrapes(cfg) -> list[dict]:
    # Counters are each replica's own (Prometheus scrapes every replica);
    # in the HA pass a load balancer alternates between two replicas
    # request by request, so two scrapes in a row read both.
    return [_families(cfg), _families(cfg)]


def _total(scrapes, family: str, name: str, **labels) -> float:
    total = 0.0
    for fams in scrapes:
        for s in fams[family].samples if family in fams else []:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_prometheus_metrics_parse_and_count(cfg, spawn):
    execs = ("stacyvm_exec_duration_seconds", "stacyvm_exec_duration_seconds_count")
    before = _total(_scrapes(cfg), *execs, provider=cfg.provider, status="completed")
    sb = spawn()
    r = sb.exec("echo metrics-probe")
    assert r.exit_code == 0, r
    scrapes = _scrapes(cfg)
    # Read from the database: every replica says the same.
    live = _total(scrapes[:1], "stacyvm_sandboxes", "stacyvm_sandboxes", state="running", provider=cfg.provider)
    assert live >= 1, scrapes[0].get("stacyvm_sandboxes")
    spawned = _total(
        scrapes, "stacyvm_spawn_duration_seconds", "stacyvm_spawn_duration_seconds_count",
        provider=cfg.provider, outcome="ok",
    )
    assert spawned >= 1
    after = _total(scrapes, *execs, provider=cfg.provider, status="completed")
    assert after >= before + 1, (before, after)
    out = _total(scrapes, "stacyvm_exec_output_bytes", "stacyvm_exec_output_bytes_total", stream="stdout")
    assert out >= len("metrics-probe\n")
    assert all(f["stacyvm_http_requests"].type == "counter" for f in scrapes)
    routes = {s.labels["route"] for f in scrapes for s in f["stacyvm_http_requests"].samples}
    assert "/api/v1/sandboxes/{id}/exec" in routes, routes
    assert not any(sb.id in r for r in routes), "routes are templates, never paths"


class _Events:
    """An open /api/v1/events stream."""

    def __init__(self, cfg, last_event_id: str | None = None):
        headers = {**_headers(cfg), "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self._client = httpx.Client(timeout=httpx.Timeout(30, read=15))
        self._cm = self._client.stream("GET", f"{cfg.url}/api/v1/events", headers=headers)
        self._resp = self._cm.__enter__()
        assert self._resp.status_code == 200
        assert self._resp.headers["content-type"].startswith("text/event-stream")
        self._lines = self._resp.iter_lines()

    def next(self) -> dict:
        event = {"event": "message", "id": None, "data": ""}
        for line in self._lines:
            if line == "":
                if event["data"]:
                    event["data"] = json.loads(event["data"])
                    return event
                event = {"event": "message", "id": None, "data": ""}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                event["data"] += value
            elif field in ("event", "id"):
                event[field] = value
        raise AssertionError("the event stream ended")

    def until(self, name: str, sandbox_id: str) -> list[dict]:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            e = self.next()
            seen.append(e)
            if e["event"] == name and e["data"].get("sandbox_id") == sandbox_id:
                return seen
        raise AssertionError(f"no {name} for {sandbox_id}: {seen}")

    def close(self):
        self._cm.__exit__(None, None, None)
        self._client.close()


def test_events_resume_after_last_event_id(cfg, spawn):
    stream = _Events(cfg)
    sb = spawn()
    seen = stream.until("sandbox.running", sb.id)
    assert all(e["id"] for e in seen), seen
    last = seen[-1]["id"]
    stream.close()

    # Missed while away, then replayed on reconnect.
    sb.exec("true")
    sb.destroy()
    resumed = _Events(cfg, last_event_id=last)
    missed = resumed.until("sandbox.destroyed", sb.id)
    resumed.close()
    names = [e["event"] for e in missed]
    assert "gap" not in names, missed
    assert last not in [e["id"] for e in missed], "the last event seen is not repeated"
    assert "exec.completed" in names, names
    assert names.index("exec.completed") < names.index("sandbox.destroyed"), names
