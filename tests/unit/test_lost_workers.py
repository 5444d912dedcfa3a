"""Which workers the operator reports to the rendezvous store as lost."""
import pytest

from lepton_operator.job import observe
from lepton_operator.job.state import PodView

pytestmark = pytest.mark.unit


def pod(uid, ip, phase="Running", deleting=False, index=0):
    return PodView(name=f"w-{uid}", uid=uid, index=index, phase=phase, deleting=deleting, ip=ip)


def observed(*pods):
    return list(pods)


def memory():
    return observe.JobMemory(status={}, phases=None)


def lost_workers(m: observe.JobMemory, pods: list[PodView]) -> list[str]:
    """The workers one reconcile finds lost; the memory keeps the active ones' addresses."""
    lost, m.addrs = observe.lost_workers(m.addrs, pods, m.deleted)
    return list(lost)


def test_a_worker_that_was_active_and_is_not_now_is_lost_once():
    m = memory()
    assert lost_workers(m, observed(pod("a", "10.0.0.1"), pod("b", "10.0.0.2", index=1))) == []
    # b is being deleted (kubectl delete pod), a fails: both are lost, once.
    now = observed(pod("a", "10.0.0.1", phase="Failed"), pod("b", "10.0.0.2", deleting=True, index=1))
    assert lost_workers(m, now) == ["10.0.0.1", "10.0.0.2"]
    assert lost_workers(m, now) == []
    # gone without a trace in between: still lost
    lost_workers(m, observed(pod("c", "10.0.0.3")))
    assert lost_workers(m, observed()) == ["10.0.0.3"]


def test_workers_the_operator_deletes_are_lost_but_not_an_address_reused_by_an_active_worker():
    m = memory()
    lost_workers(m, observed(pod("a", "10.0.0.1"), pod("b", "10.0.0.2", index=1)))
    m.deleted.add("b")                                   # a scale-down: the operator deletes b
    assert lost_workers(m, observed(pod("a", "10.0.0.1"), pod("b", "10.0.0.2", index=1))) == ["10.0.0.2"]
    lost_workers(m, observed(pod("c", "10.0.0.3")))
    # c is gone and its replacement d got the same address: reporting it would drop d
    assert lost_workers(m, observed(pod("d", "10.0.0.3"))) == []


def test_a_worker_without_an_address_yet_was_never_in_the_rendezvous():
    m = memory()
    lost_workers(m, observed(pod("a", "", phase="Pending")))
    assert lost_workers(m, observed()) == []


def test_a_worker_that_succeeded_is_not_lost():
    m = memory()
    lost_workers(m, observed(pod("a", "10.0.0.1"), pod("b", "10.0.0.2", index=1)))
    done = observed(pod("a", "10.0.0.1", phase="Succeeded"), pod("b", "10.0.0.2", phase="Succeeded", index=1))
    assert lost_workers(m, done) == []
