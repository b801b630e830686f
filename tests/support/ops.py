"""A plain HTTP client for the operations endpoint of a real `mta serve` (urllib: no mocks)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def request(base: str, path: str, *, method: str = "GET", token: str | None = None,
            headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; error statuses are returned, not raised."""
    req = urllib.request.Request(base + path, method=method, data=data, headers=dict(headers or {}))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def get_json(base: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    status, headers, body = request(base, path, **kwargs)
    assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body[:200])
    return status, json.loads(body)


def scrape(base: str) -> Samples:
    """Every sample of GET /metrics, parsed by prometheus-client's own parser."""
    status, headers, body = request(base, "/metrics")
    assert status == 200, (status, body[:200])
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def families(base: str) -> set[str]:
    status, _headers, body = request(base, "/metrics")
    assert status == 200
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def delta(before: Samples, after: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The series of `name` that changed between two scrapes, with how much (zero changes left out)."""
    old, new = series(before, name), series(after, name)
    out = {k: new.get(k, 0.0) - old.get(k, 0.0) for k in set(old) | set(new)}
    return {k: v for k, v in out.items() if v}


def wait_value(base: str, name: str, expected: float, timeout: float = 10.0, **labels: str) -> Samples:
    """Scrape until `name{labels}` equals `expected` (the child's counts arrive over a pipe)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base)
        if value(samples, name, **labels) == expected:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {value(samples, name, **labels)}, expected {expected}")
        time.sleep(0.05)


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def wait_up(base: str, timeout: float = 10.0) -> None:
    """Until /healthz answers (the endpoint starts right after the SMTP listeners)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if request(base, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{base}/healthz never answered")
        time.sleep(0.05)
