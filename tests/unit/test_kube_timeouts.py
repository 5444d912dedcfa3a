"""Every request the operator makes to the API server has a timeout, so a hung connection
ends one reconcile (which the loop retries) instead of holding an API thread forever.

The recording client stands in for the kubernetes client's ApiClient: it shows the timeout
each call passes down; that urllib3 then gives up is the client library's contract."""
from __future__ import annotations

import threading

import pytest

from lepton_operator.core import kube

pytestmark = pytest.mark.unit


class Response:
    status, reason = 200, "OK"

    def read(self) -> bytes:
        return b"{}"


class RecordingClient:
    def __init__(self) -> None:
        self.timeouts: list = []

    def param_serialize(self, method, resource_path, query_params, header_params, body, auth_settings):
        return method, resource_path, header_params, body, None

    def call_api(self, method, url, header_params=None, body=None, _request_timeout=None):
        self.timeouts.append(_request_timeout)
        return Response()


def test_every_verb_has_a_timeout(monkeypatch):
    client = RecordingClient()
    monkeypatch.setattr(kube, "_client", client)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}}
    kube.get("v1", "Pod", "p", "ns")
    kube.create(pod)
    kube.apply(pod)
    kube.patch("v1", "Pod", "p", "ns", {"metadata": {}})
    kube.delete("v1", "Pod", "p", "ns")
    kube.list_objects("v1", "Pod", "ns")
    kube.get("v1", "Pod", "p", "ns", timeout=3)
    assert client.timeouts[:-1] == [kube.REQUEST_TIMEOUT] * 6 and client.timeouts[-1] == 3
    assert all(t is not None for t in client.timeouts)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the SystemExit below
def test_the_cluster_wide_pod_list_and_watch_have_timeouts(monkeypatch):
    """clusterGpuUsage's own list and watch: a silent connection ends (and it lists again)."""
    import kubernetes

    from lepton_operator.job import gpu_usage

    calls, watching = [], threading.Event()

    class Api:
        def sanitize_for_serialization(self, obj):
            return obj

    class Core:
        def __init__(self, api):
            pass

        def list_pod_for_all_namespaces(self, **kwargs):
            calls.append(kwargs)
            return {"items": [], "metadata": {"resourceVersion": "7"}}

    class Watch:
        def stream(self, func, **kwargs):
            calls.append(kwargs)
            watching.set()
            raise SystemExit      # ends the thread (the loop retries every Exception)

    monkeypatch.setattr(kube, "_client", Api())
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", Core)
    monkeypatch.setattr(kubernetes.watch, "Watch", Watch)
    gpu_usage.ClusterGpuUsage(lambda: None).start()
    assert watching.wait(30)
    for thread in threading.enumerate():
        if thread.name == "cluster-pod-requests":
            thread.join(30)
    listed, watched = calls
    assert listed["_request_timeout"] == kube.REQUEST_TIMEOUT
    connect, read = watched["_request_timeout"]
    assert connect == kube.REQUEST_TIMEOUT[0] and read > watched["timeout_seconds"] == gpu_usage.WATCH_SECONDS


def test_kopfs_own_requests_end_as_the_operators_do():
    """kopf's short requests (patches of status, its own lists) end within the operator's
    timeout; its watches within a client timeout past the server's."""
    import kopf

    from lepton_operator import handlers

    settings = kopf.OperatorSettings()
    handlers.kopf_settings(settings)
    assert settings.networking.connect_timeout == kube.REQUEST_TIMEOUT[0]
    assert settings.networking.request_timeout == sum(kube.REQUEST_TIMEOUT)
    assert settings.watching.server_timeout < settings.watching.client_timeout < float("inf")
