"""The rendezvous store's token: the plan creates the job's Secret before the store pod that
mounts it, the loop remembers the token it created, and reports of lost workers carry it."""
import datetime as dt

import pytest

from lepton_operator.job import objects, observe, state
from lepton_operator.job.capacity import Capacity
from lepton_operator.job.spec import parse_job

pytestmark = pytest.mark.unit

META = {"name": "train", "namespace": "ns", "uid": "uid-1", "generation": 1}
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
ALL_CHILDREN = frozenset({("Pod", "train-rdzv"), ("Service", "train-rdzv"), ("Service", "train-workers")})
READY_STORE = state.StoreView(created="2026-01-01T11:00:00Z", ready=True, deleting=False)


def spec(**fields):
    return parse_job("train", {"workers": {"min": 1, "max": 2, "replicas": 2}, **fields}, "trainer:1")


def worker(index, ip, phase="Running"):
    return state.PodView(name=f"train-worker-{index}", uid=f"w{index}", index=index, phase=phase, ip=ip,
                         node="n1", ready=phase == "Running")


def plan(job_spec, children=frozenset(), secret=None, lost=(), status=None, pods=()):
    workers = state.Workers({p.name: p for p in pods}, tuple(pods), lost=tuple(lost))
    observed = state.JobObserved(meta=META, status=status, workers=workers, now=NOW, free_slots=8,
                                 store=READY_STORE if ("Pod", "train-rdzv") in children else state.MISSING_STORE,
                                 store_secret=secret, children=children, reports_lost_workers=True,
                                 trainer_image="trainer:1")
    return observed, state.plan(job_spec, observed)


def creates(actions, kind, name):
    return [a for a in actions if a.verb == "create" and a.kind == kind and a.name == name]


def test_a_new_jobs_secret_is_created_before_the_store_pod_that_mounts_it():
    _, p = plan(spec(), secret=state.StoreSecret("t0ken", exists=False))
    [secret] = creates(p.actions, "Secret", "train-rdzv")
    assert secret.body == objects.rendezvous_secret(objects.owner(META), "t0ken")
    assert [(a.kind, a.name) for a in secret.then] == [("Pod", "train-rdzv")]     # only once the Secret exists
    assert creates(p.actions, "Pod", "train-rdzv") == []
    assert creates(p.actions, "Service", "train-rdzv")                           # independent of it
    assert "t0ken" not in str(p.status)


def test_an_existing_secret_is_not_created_again_and_the_store_pod_goes_out_at_once():
    _, p = plan(spec(), secret=state.StoreSecret("t0ken", exists=True))
    assert creates(p.actions, "Secret", "train-rdzv") == []
    assert creates(p.actions, "Pod", "train-rdzv")


def test_an_older_jobs_running_store_gets_a_secret_and_is_not_replaced():
    _, p = plan(spec(), ALL_CHILDREN, secret=state.StoreSecret("t0ken", exists=False))
    [secret] = creates(p.actions, "Secret", "train-rdzv")
    assert secret.then == () and creates(p.actions, "Pod", "train-rdzv") == []


def test_a_lighthouse_gets_no_secret():
    _, p = plan(spec(faultTolerance="perStep"), secret=state.StoreSecret("t0ken", exists=False))
    assert creates(p.actions, "Secret", "train-rdzv") == [] and creates(p.actions, "Pod", "train-rdzv")


@pytest.mark.parametrize("secret, sent", [
    (state.StoreSecret("t0ken", exists=True), "t0ken"),
    (state.StoreSecret("not-created-yet", exists=False), None),    # an older job's store: no token
])
def test_lost_workers_are_reported_with_the_stores_token(secret, sent):
    pods = [worker(0, "10.0.0.1")]
    _, p = plan(spec(), ALL_CHILDREN, secret=secret, lost=["10.0.0.2"], status={"phase": "Running"}, pods=pods)
    assert p.report_lost == ("10.0.0.2",) and p.report_token == sent
    assert "t0ken" not in repr(p) and "t0ken" not in str(p.status)


@pytest.mark.parametrize("answer, remembered", [({"kind": "Secret"}, "t0ken"), (None, None)])
def test_the_loop_remembers_the_token_of_the_secret_it_created(answer, remembered):
    """A create that found the Secret already there (None) leaves the token unknown: it is
    read from the Secret when next needed."""
    observed, p = plan(spec(), secret=state.StoreSecret("t0ken", exists=False))
    memory = observe.new_memory({})
    results = [(a, answer if a.kind == "Secret" else {"kind": a.kind}) for a in p.actions]
    observe.remember(memory, observed, p, results, Capacity(wake=lambda *_: None))
    assert memory.rdzv_token == remembered
    assert "t0ken" not in repr(memory)



@pytest.mark.parametrize("status, children, reads", [
    ({}, {}, 0),                                             # a new job: nothing of it exists yet
    ({"phase": "Pending"}, {}, 1),                           # reconciled before: the Secret may exist
    ({}, {("ns", "train"): ["train-rdzv"]}, 1),              # a child exists: so may the Secret
])
def test_a_new_jobs_token_is_made_without_reading_the_secret(monkeypatch, status, children, reads):
    import asyncio

    from lepton_operator.core import kube
    calls = []

    async def answer(fn, *args, **kwargs):
        calls.append((fn.__name__, args))
        return None                                          # the Secret does not exist
    monkeypatch.setattr(kube, "aio", answer)
    indices = {"lepton_job_workers": {}, "lepton_job_rdzv_pods": {}, "lepton_pod_requests": {}, "lepton_nodes": {},
               "lepton_job_services": children, "lepton_job_network_policies": {}}
    body = {"metadata": {**META, "namespace": "ns"}, "spec": {}, "status": status}
    observed = asyncio.run(observe.observe(body, spec(), observe.new_memory(status), indices,
                                           Capacity(wake=lambda *_: None)))
    assert observed.store_secret is not None and observed.store_secret.exists is False
    assert len(observed.store_secret.token) >= 32
    assert [args for name, args in calls if name == "get"] == [("v1", "Secret", "train-rdzv", "ns")] * reads
