"""Async client for the Prometheus HTTP API (instant queries), built on aiohttp.

A ``QueryResult`` keeps every series' value (``values``, ±Inf included, NaN left out)
and says which of three things happened: an answer with numbers, an answer with no
number (``empty``: no series, or only NaN), or an error (``error``: bad PromQL or
another 4xx, an outage, a timeout). The autoscalers read ``value``: the one finite
number of a one-series answer, else None, which holds the size: an unreachable
Prometheus never scales anything down. Canary analysis judges each series of
``values`` and tells ``empty`` from ``error``. Timeouts are short, so a slow Prometheus
never blocks a reconcile for long. ``validate`` asks Prometheus to parse a query
without running it.

``render`` fills ``${name}`` placeholders in a user's PromQL; ``client()`` is the
operator's one client, built from its settings on first use.
"""

from __future__ import annotations

import asyncio
import math
import string
from dataclasses import dataclass

import aiohttp

from .. import config


@dataclass(frozen=True)
class QueryResult:
    """One instant query's answer: its series' values, or why there are none."""

    query: str
    values: tuple[float, ...] = ()
    error: str | None = None       # why there is no usable value (set when ``values`` is empty)
    failed: bool = False           # the query itself failed (bad PromQL, HTTP error, outage)

    @property
    def value(self) -> float | None:
        """The number of a one-series, finite answer; None otherwise (no data)."""
        if len(self.values) == 1 and math.isfinite(self.values[0]):
            return self.values[0]
        return None

    @property
    def ok(self) -> bool:
        return self.value is not None

    @property
    def empty(self) -> bool:
        return not self.values and not self.failed


def no_data(query: str, why: str) -> QueryResult:
    return QueryResult(query, (), why)


def query_error(query: str, why: str) -> QueryResult:
    return QueryResult(query, (), why, failed=True)


def parse_response(query: str, payload: dict) -> QueryResult:
    """Reduce a ``/api/v1/query`` JSON answer to its series' values.

    A scalar gives one value, a vector one per series. NaN is left out; an answer with
    no number left is empty. ``value`` (what the autoscalers read) is set only for one
    finite series: several series or ±Inf are no data to them.
    """
    if payload.get("status") != "success":
        return query_error(query, f"{payload.get('errorType', 'error')}: {payload.get('error', '?')}")
    data = payload.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        raws = [result[1]]
    elif kind == "vector":
        raws = [series["value"][1] for series in result or ()]
    else:
        return query_error(query, f"unsupported result type {kind!r}; use an instant vector or scalar")
    try:
        values = tuple(v for v in (float(r) for r in raws) if not math.isnan(v))
    except (TypeError, ValueError):
        return query_error(query, f"not a number in {raws!r}")
    if not values:
        return no_data(query, "empty result (no series matched)" if not raws else f"value is {raws[0]}")
    error = None
    if len(values) > 1:
        error = f"{len(values)} series returned; aggregate the query to one series, e.g. with sum(...)"
    elif not math.isfinite(values[0]):
        error = f"value is {raws[0]}"
    return QueryResult(query, values, error)


class Prometheus:
    """Instant queries against ``base_url`` with a per-query ``timeout`` in seconds."""

    def __init__(self, base_url: str, timeout: float = 2.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _post(self, path: str, promql: str) -> dict | QueryResult:
        """The JSON answer to ``path``, or a failed QueryResult saying why there is none."""
        try:
            async with self._client().post(f"{self.base_url}{path}", data={"query": promql}) as resp:
                if resp.status >= 500:
                    return query_error(promql, f"Prometheus answered HTTP {resp.status}")
                try:
                    return await resp.json(content_type=None)
                except ValueError:
                    return query_error(promql, f"Prometheus answered HTTP {resp.status} without JSON")
        except asyncio.TimeoutError:
            return query_error(promql, f"Prometheus at {self.base_url} did not answer within {self.timeout}s")
        except aiohttp.ClientError as exc:
            return query_error(promql, f"Prometheus at {self.base_url} is unreachable: {exc}")

    async def query(self, promql: str) -> QueryResult:
        """Evaluate ``promql`` now; never raises for network or server trouble."""
        payload = await self._post("/api/v1/query", promql)
        return payload if isinstance(payload, QueryResult) else parse_response(promql, payload)

    async def validate(self, promql: str) -> str | None:
        """Prometheus's own message when it cannot parse ``promql``; None when it parses,
        or when Prometheus cannot be asked (the query's measurements then say so)."""
        payload = await self._post("/api/v1/format_query", promql)
        if isinstance(payload, QueryResult) or payload.get("status") == "success":
            return None
        return f"{payload.get('errorType', 'error')}: {payload.get('error', '?')}"

    async def value(self, promql: str) -> float | None:
        """The query's number, or None for no data."""
        return (await self.query(promql)).value

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def render(query: str, **values: str) -> str:
    """Fill ``${key}`` placeholders (``$key`` too) in a PromQL query; others stay as they are."""
    return string.Template(query).safe_substitute(values)


_client: Prometheus | None = None


def client() -> Prometheus:
    """The operator's Prometheus client (URL and timeout from its settings)."""
    global _client
    if _client is None:
        s = config.get()
        _client = Prometheus(s.prometheus_url, s.prometheus_timeout)
    return _client


def unavailable(needs: list[str]) -> list[str]:
    """Problems for the fields in ``needs`` when the operator runs without a Prometheus URL."""
    if config.get().prometheus_enabled or not needs:
        return []
    return [f"{field} needs Prometheus, and the operator runs without one: set LEPTON_PROMETHEUS_URL "
            "(the chart's prometheus.url)" for field in needs]
