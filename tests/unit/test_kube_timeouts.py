"""Every request the operator makes to the API server has a timeout, so a hung connection
ends one reconcile (which the loop retries) instead of holding an API thread forever.

The recording client stands in for the kubernetes client's ApiClient: it shows the timeout
each call passes down; that urllib3 then gives up is the client library's contract."""
from __future__ import annotations

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
