"""kopf keeps no diff base for the operator (``handlers.NoDiffBase``): every handler follows
watch events, so no handler may react to changes, which would compare against one."""
from __future__ import annotations

import kopf
import pytest

from lepton_operator import handlers

pytestmark = pytest.mark.unit


def test_no_registered_handler_reacts_to_changes():
    registry = kopf.get_default_registry()
    assert registry._watching.get_all_handlers(), "the operator's handlers are not registered"
    assert registry._changing.get_all_handlers() == []      # on.create / on.update / on.resume / on.delete
    assert registry._spawning.get_all_handlers() == []      # daemons and timers (reset by a diff)


def test_kopf_builds_and_reads_no_diff_base():
    settings = kopf.OperatorSettings()
    handlers.kopf_settings(settings=settings)
    pod = kopf.Body({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"},
                                                                     "annotations": {"x": "y"}},
                     "spec": {"containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}})
    storage = settings.persistence.diffbase_storage
    assert storage.build(body=pod) is None and storage.fetch(body=pod) is None
    assert settings.posting.enabled is False
