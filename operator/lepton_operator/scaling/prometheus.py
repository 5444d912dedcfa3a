"""Async client for the Prometheus HTTP API (instant queries), built on aiohttp.

An outage, a timeout, an error answer or an empty result is *no data*: ``value`` is
None and ``error`` says why. It is never read as 0, so an unreachable Prometheus can
never scale anything down. Timeouts are short, so a slow Prometheus never blocks a
reconcile for long.

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
    """One instant query's answer: a number, or None and the reason there is none."""

    query: str
    value: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


def parse_response(query: str, payload: dict) -> QueryResult:
    """Reduce a ``/api/v1/query`` JSON answer to one number.

    A scalar, or a vector with exactly one series, gives its value. No series, several
    series (the query must aggregate, e.g. ``sum(...)``), NaN or infinity give no data.
    """
    if payload.get("status") != "success":
        return QueryResult(query, None, f"{payload.get('errorType', 'error')}: {payload.get('error', '?')}")
    data = payload.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        raw = result[1]
    elif kind == "vector":
        if not result:
            return QueryResult(query, None, "empty result (no series matched)")
        if len(result) > 1:
            return QueryResult(query, None, f"{len(result)} series returned; aggregate the query "
                                            "to one series, e.g. with sum(...)")
        raw = result[0]["value"][1]
    else:
        return QueryResult(query, None, f"unsupported result type {kind!r}; use an instant vector or scalar")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return QueryResult(query, None, f"not a number: {raw!r}")
    if math.isnan(value) or math.isinf(value):
        return QueryResult(query, None, f"value is {raw}")
    return QueryResult(query, value)


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

    async def query(self, promql: str) -> QueryResult:
        """Evaluate ``promql`` now; never raises for network or server trouble."""
        url = f"{self.base_url}/api/v1/query"
        try:
            async with self._client().post(url, data={"query": promql}) as resp:
                if resp.status >= 500:
                    return QueryResult(promql, None, f"Prometheus answered HTTP {resp.status}")
                try:
                    payload = await resp.json(content_type=None)
                except ValueError:
                    return QueryResult(promql, None, f"Prometheus answered HTTP {resp.status} without JSON")
        except asyncio.TimeoutError:
            return QueryResult(promql, None, f"Prometheus at {self.base_url} did not answer within {self.timeout}s")
        except aiohttp.ClientError as exc:
            return QueryResult(promql, None, f"Prometheus at {self.base_url} is unreachable: {exc}")
        return parse_response(promql, payload)

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
