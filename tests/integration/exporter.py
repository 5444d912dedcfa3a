"""A tiny real Prometheus exporter whose series the test controls.

Run as a process (``python exporter.py PORT``); it serves ``/metrics`` with
prometheus-client and takes ``POST /set`` with JSON ``{"name", "labels", "value"}``
(a gauge) or ``{"name", "labels", "rate"}`` (a counter growing by ``rate`` per second),
and ``POST /clear`` to drop every series. ``Exporter`` starts it, registers it with the
test cluster's Prometheus and waits until Prometheus has scraped a value.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler


class _Series:
    """name -> {labels tuple -> ("gauge", value) | ("counter", rate, base, since)}."""

    def __init__(self):
        self.lock = threading.Lock()
        self.series: dict[str, dict[tuple, tuple]] = {}

    def set(self, body: dict) -> None:
        labels = tuple(sorted((body.get("labels") or {}).items()))
        with self.lock:
            per = self.series.setdefault(body["name"], {})
            if "rate" in body:
                old = per.get(labels)
                base = _counter_value(old) if old and old[0] == "counter" else 0.0
                per[labels] = ("counter", float(body["rate"]), base, time.time())
            else:
                per[labels] = ("gauge", float(body["value"]))

    def collect(self):
        with self.lock:
            items = {n: dict(s) for n, s in self.series.items()}
        for name, per in items.items():
            kinds = {v[0] for v in per.values()}
            label_names = sorted({k for labels in per for k, _ in labels})
            if kinds == {"counter"}:
                fam = CounterMetricFamily(name.removesuffix("_total"), "test counter", labels=label_names)
            else:
                fam = GaugeMetricFamily(name, "test gauge", labels=label_names)
            for labels, v in per.items():
                d = dict(labels)
                fam.add_metric([d.get(k, "") for k in label_names],
                               _counter_value(v) if v[0] == "counter" else v[1])
            yield fam


def _counter_value(v: tuple) -> float:
    _, rate, base, since = v
    return base + rate * (time.time() - since)


def serve(port: int) -> None:
    series = _Series()
    registry = CollectorRegistry()
    registry.register(series)
    base = MetricsHandler.factory(registry)

    class Handler(base):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/set":
                series.set(body)
            elif self.path == "/clear":
                with series.lock:
                    series.series.clear()
            else:
                self.send_error(404)
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


class Exporter:
    """The exporter process, scraped by ``cluster``'s Prometheus as target ``name``; with a
    ``namespace``, its series carry that ``namespace`` target label, as a pod's do when
    Prometheus discovers it in that namespace."""

    def __init__(self, cluster, name: str, port: int, namespace: str | None = None):
        self.cluster, self.name, self.port = cluster, name, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, __file__, str(port)])
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/metrics", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the test exporter did not start")
                time.sleep(0.1)
        cluster.add_scrape_target(name, f"127.0.0.1:{port}", {"namespace": namespace} if namespace else None)

    def _post(self, path: str, body: dict) -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()

    def set(self, name: str, value: float, **labels: str) -> None:
        self._post("/set", {"name": name, "labels": labels, "value": value})

    def rate(self, name: str, rate: float, **labels: str) -> None:
        self._post("/set", {"name": name, "labels": labels, "rate": rate})

    def prometheus_value(self, query: str) -> float | None:
        """The query's value in the cluster's Prometheus now (None: no data)."""
        url = f"{self.cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            data = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
        except OSError:
            return None
        return float(data[0]["value"][1]) if data else None

    def stop(self) -> None:
        self.cluster.remove_scrape_target(self.name)
        self.proc.terminate()
        self.proc.wait(timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
