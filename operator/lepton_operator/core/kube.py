"""The one module that talks to the Kubernetes API server.

Built on the official ``kubernetes`` client's ``ApiClient`` (authentication, TLS,
connection pool) with a small generic layer on top, so every kind (core, apps, batch,
autoscaling, the lepton.ai CRDs, KEDA, Gateway API) goes through the same few verbs:

- ``apply``: server-side apply with the single field manager ``lepton-operator``;
- ``create``: create, treating "already exists" as done (idempotent);
- ``get`` / ``list_objects`` / ``delete`` / ``patch`` / ``patch_status``;
- ``remove_finalizers``: drop named finalizers, never another controller's;
- ``replace``: a full update (PUT) that carries the object's resourceVersion, so a
  concurrent writer's change fails it with 409 instead of being overwritten;
- ``emit_event``: a core/v1 Event on an object;
- ``pod_log``: the tail of a container's log (``pods/log`` ``get``).

All calls are synchronous; from asyncio code use ``await kube.aio(fn, *args)``,
which runs them in a worker thread. Objects are plain dicts in and out.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import functools
import json
import threading
import uuid
from typing import Any, Callable, Collection, TypeVar

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from .. import metrics
from ..constants import FIELD_MANAGER, USER_AGENT

Obj = dict[str, Any]
T = TypeVar("T")

__all__ = ["ApiException", "load", "apply", "create", "get", "list_objects", "delete", "patch",
           "patch_status", "remove_finalizers", "replace", "emit_event", "pod_log", "is_not_found", "is_conflict", "aio",
           "RETRYABLE", "describe", "Refused"]

# Errors after which a reconcile is retried: an error answer, or no answer at all (the
# API server restarting: connection refused or reset, retries exhausted).
RETRYABLE = (ApiException, urllib3.exceptions.HTTPError, ConnectionError)

# kind -> resource plural for kinds whose plural is not ``kind.lower() + "s"``
_IRREGULAR_PLURALS = {"Endpoints": "endpoints", "Ingress": "ingresses",
                      "NetworkPolicy": "networkpolicies", "PriorityClass": "priorityclasses",
                      "StorageClass": "storageclasses"}
_CLUSTER_SCOPED = {"Node", "Namespace", "CustomResourceDefinition", "PersistentVolume",
                   "StorageClass", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}

_THREADS = 16       # concurrent API requests from asyncio code (see ``aio``)
# Every request ends: (connect, read) seconds. A hung connection fails the reconcile, which
# the loop retries (``RETRYABLE``), instead of holding one of the _THREADS forever.
REQUEST_TIMEOUT = (5.0, 30.0)
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="kube")
_lock = threading.Lock()
_client: kubernetes.client.ApiClient | None = None


def load(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """Load in-cluster config, else ``kubeconfig`` / ``$KUBECONFIG`` / ~/.kube/config."""
    global _client
    with _lock:
        config = kubernetes.client.Configuration()
        try:
            if kubeconfig:
                raise kubernetes.config.ConfigException("explicit kubeconfig")
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
        config.connection_pool_maxsize = max(config.connection_pool_maxsize or 0, _THREADS)
        _client = kubernetes.client.ApiClient(config)
        _client.user_agent = USER_AGENT
        return _client


def _api() -> kubernetes.client.ApiClient:
    return _client or load()


def path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    """REST path of a collection or an object, e.g. ``/api/v1/namespaces/ns/pods/p``."""
    plural = _IRREGULAR_PLURALS.get(kind, kind.lower() + "s")
    parts = ["/api/v1" if api_version == "v1" else f"/apis/{api_version}"]
    if namespace and kind not in _CLUSTER_SCOPED:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def request(method: str, url_path: str, body: Any = None, query: list[tuple[str, Any]] | None = None,
            content_type: str = "application/json", timeout: float | None = None) -> Obj | None:
    """One HTTP request; raises ``ApiException`` on a non-2xx answer. ``timeout``: seconds
    for the whole request (None: ``REQUEST_TIMEOUT``)."""
    data = _send(method, url_path, query or [], {"Content-Type": content_type, "Accept": "application/json"},
                 body, timeout)
    return json.loads(data) if data else None


def _send(method: str, url_path: str, query: list[tuple[str, Any]], headers: dict[str, str], body: Any,
          timeout: float | None) -> bytes:
    """One HTTP request with the client's credentials, counted; the answer's body, or
    ``ApiException`` on a non-2xx answer."""
    api = _api()
    method, url, headers, body, _ = api.param_serialize(
        method=method, resource_path=url_path, query_params=query, header_params=headers,
        body=body, auth_settings=["BearerToken"])
    resp = api.call_api(method, url, header_params=headers, body=body,
                        _request_timeout=timeout if timeout is not None else REQUEST_TIMEOUT)
    data = resp.read()
    metrics.API_REQUESTS.labels(method, str(resp.status)).inc()
    if not 200 <= resp.status <= 299:
        raise ApiException(status=resp.status, reason=resp.reason,
                           body=data.decode("utf-8", "replace") if data else None)
    return data


def describe(exc: BaseException) -> str:
    """A one-line description of a failed request."""
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message", "")
        except ValueError:
            message = (exc.body or "")[:300]
        return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409


class Refused(ApiException):
    """The API server refused an object as invalid (422 Unprocessable Entity): sending the
    same object again cannot succeed. ``problem`` names the object and quotes the server,
    whose message names the field (``spec.nodeSelector: Invalid value: ...``)."""

    def __init__(self, exc: ApiException, obj: Obj):
        super().__init__(status=exc.status, reason=exc.reason)
        self.body, self.headers = exc.body, exc.headers
        message = describe(exc).partition(": ")[2] or str(exc.reason)
        self.problem = f"the API server refuses {obj.get('kind')} {obj.get('metadata', {}).get('name')}: {message}"


def _refused(exc: ApiException, obj: Obj) -> ApiException:
    return Refused(exc, obj) if exc.status == 422 else exc


def _coords(obj: Obj) -> tuple[str, str, str | None, str]:
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]


def apply(obj: Obj, force: bool = True) -> Obj:
    """Server-side apply ``obj`` (a full intent) as field manager ``lepton-operator``."""
    api_version, kind, namespace, name = _coords(obj)
    query = [("fieldManager", FIELD_MANAGER)] + ([("force", "true")] if force else [])
    try:
        return request("PATCH", path(api_version, kind, namespace, name), obj, query,
                       "application/apply-patch+yaml")
    except ApiException as exc:
        raise _refused(exc, obj) from None


def create(obj: Obj, timeout: float | None = None) -> Obj | None:
    """Create ``obj``; returns the created object, or None if it already existed."""
    api_version, kind, namespace, _ = _coords(obj)
    try:
        return request("POST", path(api_version, kind, namespace), obj,
                       [("fieldManager", FIELD_MANAGER)], timeout=timeout)
    except ApiException as exc:
        if is_conflict(exc):
            return None
        raise _refused(exc, obj) from None


def get(api_version: str, kind: str, name: str, namespace: str | None = None,
        timeout: float | None = None) -> Obj | None:
    """The object, or None if it does not exist."""
    try:
        return request("GET", path(api_version, kind, namespace, name), timeout=timeout)
    except ApiException as exc:
        if is_not_found(exc):
            return None
        raise


def list_objects(api_version: str, kind: str, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None) -> list[Obj]:
    """Items of a collection (namespace None: across all namespaces)."""
    query = [(k, v) for k, v in (("labelSelector", label_selector),
                                 ("fieldSelector", field_selector)) if v]
    return request("GET", path(api_version, kind, namespace), query=query).get("items", [])


def delete(api_version: str, kind: str, name: str, namespace: str | None = None,
           propagation: str = "Background", grace_period_seconds: int | None = None) -> bool:
    """Delete; True if a deletion was requested, False if the object was already gone."""
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
    if grace_period_seconds is not None:
        body["gracePeriodSeconds"] = grace_period_seconds
    try:
        request("DELETE", path(api_version, kind, namespace, name), body)
        return True
    except ApiException as exc:
        if is_not_found(exc):
            return False
        raise


def pod_log(name: str, namespace: str, container: str, tail_lines: int, limit_bytes: int,
            timeout: float | None = None) -> str:
    """The last ``tail_lines`` lines of a container's log, ``limit_bytes`` bytes at most."""
    query = [("container", container), ("tailLines", tail_lines), ("limitBytes", limit_bytes)]
    data = _send("GET", path("v1", "Pod", namespace, name, "log"), query, {"Accept": "application/json, */*"},
                 None, timeout)
    return data.decode("utf-8", "replace")


def patch(api_version: str, kind: str, name: str, namespace: str | None, body: Any,
          subresource: str | None = None, patch_type: str = "merge") -> Obj:
    """JSON merge patch (``patch_type="merge"``), or ``"json"`` / ``"strategic"``."""
    content_type = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                    "strategic": "application/strategic-merge-patch+json"}[patch_type]
    return request("PATCH", path(api_version, kind, namespace, name, subresource), body,
                   [("fieldManager", FIELD_MANAGER)], content_type)


def remove_finalizers(obj: Obj, names: Collection[str]) -> Obj | None:
    """Remove ``names`` from ``obj``'s ``metadata.finalizers`` with one JSON patch that first
    tests the list is still the one ``obj`` shows, so a finalizer another controller added
    meanwhile is never dropped. Returns the patched object; None when there was nothing to
    remove, the object is gone, or its list changed (the caller tries again on the next body)."""
    api_version, kind, namespace, name = _coords(obj)
    current = list(obj.get("metadata", {}).get("finalizers") or ())
    kept = [f for f in current if f not in names]
    if kept == current:
        return None
    ops = [{"op": "test", "path": "/metadata/finalizers", "value": current},
           {"op": "replace", "path": "/metadata/finalizers", "value": kept}]
    try:
        return patch(api_version, kind, name, namespace, ops, patch_type="json")
    except ApiException as exc:
        if is_not_found(exc) or exc.status == 422:      # 422: the test failed, the list changed
            return None
        raise


def replace(obj: Obj, timeout: float | None = None) -> Obj | None:
    """Replace ``obj`` (PUT). With ``metadata.resourceVersion`` set, the write succeeds only
    if nobody changed the object since it was read; returns the stored object, or None on
    that conflict (409)."""
    api_version, kind, namespace, name = _coords(obj)
    try:
        return request("PUT", path(api_version, kind, namespace, name), obj,
                       [("fieldManager", FIELD_MANAGER)], timeout=timeout)
    except ApiException as exc:
        if is_conflict(exc):
            return None
        raise


def patch_status(api_version: str, kind: str, name: str, namespace: str | None,
                 status: dict[str, Any]) -> Obj:
    """Merge-patch ``.status`` through the status subresource."""
    return patch(api_version, kind, name, namespace, {"status": status}, subresource="status")


def emit_event(obj: Obj, type_: str, reason: str, message: str,
               component: str = FIELD_MANAGER) -> Obj | None:
    """Record a core/v1 Event about ``obj`` (shown by ``kubectl describe``).

    A failure to record the event returns None: an event is never worth failing a
    reconcile for.
    """
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:16]}",
                     "namespace": namespace},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                           "name": meta.get("name"), "namespace": meta.get("namespace"),
                           "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": component}, "reportingComponent": component,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }
    try:
        return create(event)
    except ApiException:
        return None


async def aio(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call of this module in the API thread pool."""
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))
