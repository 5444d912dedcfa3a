"""Requests (cpu, memory, GPUs) of the pods of every namespace, for an operator that
watches named ones and is asked to read them (``cluster_gpu_usage``).

kopf watches pods only in the namespaces the operator serves, so its index
(``handlers.lepton_pod_requests``) misses what pods elsewhere hold, and free capacity
would be overcounted. ``ClusterGpuUsage`` keeps the same view for the whole cluster from
one list and watch of non-terminal pods (read-only: ``list`` and ``watch`` of pods
cluster-wide, which the chart grants with ``clusterGpuUsage``). It runs in a thread of
its own; the asyncio side reads ``usage()`` and is woken through ``on_change`` when a pod
that held capacity on a node lets it go.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import kubernetes

from .. import config
from ..core import kube
from .fit import Requests, pod_usage

# Terminal pods hold no capacity; the watch reports a pod that turns terminal as DELETED.
FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"
WATCH_SECONDS = 300
# A silent connection ends the watch (and it lists again): the server ends a healthy one
# after WATCH_SECONDS, sending bookmarks meanwhile.
WATCH_REQUEST_TIMEOUT = (kube.REQUEST_TIMEOUT[0], WATCH_SECONDS + kube.REQUEST_TIMEOUT[1])
SYNC_WAIT_SECONDS = 30.0     # how long start-up waits for the first list

_log = logging.getLogger("lepton_operator")


class ClusterGpuUsage:
    """node name (None: not bound yet) -> requests of each non-terminal pod (``fit.pod_usage``),
    cluster-wide; the shape of kopf's index, so the planner reads either."""

    def __init__(self, on_change: Callable[[], None]):
        self._pods: dict[str, tuple[str | None, Requests]] = {}     # uid -> (node, requests)
        self._lock = threading.Lock()
        self._on_change = on_change
        self.synced = threading.Event()

    def usage(self) -> dict[str | None, list[Requests]]:
        with self._lock:
            pods = list(self._pods.values())
        out: dict[str | None, list[Requests]] = {}
        for node, requests in pods:
            out.setdefault(node, []).append(requests)
        return out

    def start(self) -> None:
        threading.Thread(target=self._run, name="cluster-pod-requests", daemon=True).start()

    def _apply(self, kind: str, pod: dict[str, Any]) -> None:
        """One watch event; a pod bound to a node that no longer holds capacity (deleted,
        finished) releases it: ``on_change``."""
        uid = pod["metadata"]["uid"]
        entry = None if kind == "DELETED" else pod_usage(pod)
        with self._lock:
            before = self._pods.get(uid)
            if entry is None:
                self._pods.pop(uid, None)
            else:
                self._pods[uid] = entry
        if before is not None and before[0] is not None and entry is None:
            self._on_change()

    def _run(self) -> None:
        api = kube._api()
        core = kubernetes.client.CoreV1Api(api)
        while True:
            try:
                listed = api.sanitize_for_serialization(core.list_pod_for_all_namespaces(
                    field_selector=FIELD_SELECTOR, _request_timeout=kube.REQUEST_TIMEOUT))
                fresh = {pod["metadata"]["uid"]: entry for pod in listed.get("items") or ()
                         if (entry := pod_usage(pod)) is not None}
                with self._lock:
                    self._pods = fresh
                self.synced.set()
                self._on_change()
                version = listed["metadata"]["resourceVersion"]
                while True:
                    for event in kubernetes.watch.Watch().stream(
                            core.list_pod_for_all_namespaces, field_selector=FIELD_SELECTOR,
                            resource_version=version, timeout_seconds=WATCH_SECONDS,
                            allow_watch_bookmarks=True, _request_timeout=WATCH_REQUEST_TIMEOUT):
                        obj = event["raw_object"]
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._apply(event["type"], obj)
            except kube.ApiException as exc:
                if exc.status != 410:       # 410 Gone: the version expired, list again
                    _log.warning("cluster-wide pod requests: %s; listing again", kube.describe(exc))
                    threading.Event().wait(config.get().api_retry_seconds)
            except Exception as exc:  # noqa: BLE001 - a lost connection: list again after a pause
                _log.warning("cluster-wide pod requests: %s; listing again", kube.describe(exc))
                threading.Event().wait(config.get().api_retry_seconds)
