"""Leader election on a Lease (core.leader) and its settings, against an in-memory Lease
store that behaves as the API server does (resourceVersion conflicts, 404, 409), with a
clock the tests move."""
from __future__ import annotations

import copy
import datetime as dt
import threading
import time
import urllib.error
import urllib.request

import pytest
import urllib3

from lepton_operator import config
from lepton_operator.core import kube, leader

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Leases:
    """One namespace of Leases, with the API server's optimistic concurrency."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.verbs: list[str] = []
        self.failing = False
        self.rv = 0

    def _check(self, verb: str) -> None:
        self.verbs.append(verb)
        if self.failing:
            raise urllib3.exceptions.MaxRetryError(None, "/apis/coordination.k8s.io", "connection refused")

    def get(self, name, namespace):
        self._check("get")
        obj = self.objects.get(name)
        return copy.deepcopy(obj) if obj else None

    def create(self, lease):
        self._check("create")
        name = lease["metadata"]["name"]
        if name in self.objects:
            return None
        self.rv += 1
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[name] = stored
        return copy.deepcopy(stored)

    def update(self, lease):
        self._check("update")
        name = lease["metadata"]["name"]
        current = self.objects.get(name)
        if current is None or current["metadata"]["resourceVersion"] != lease["metadata"].get("resourceVersion"):
            return None
        self.rv += 1
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[name] = stored
        return copy.deepcopy(stored)

    def holder(self, name="lepton-operator"):
        return (self.objects[name].get("spec") or {}).get("holderIdentity")


def candidate(api, clock, identity, **timings):
    cfg = leader.LeaseConfig("lepton-operator", "lepton-system", identity, **timings)
    return leader.LeaderElector(cfg, api, clock=clock,
                                now=lambda: dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
                                + dt.timedelta(seconds=clock()))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def api():
    return Leases()


def test_the_first_candidate_creates_the_lease_and_leads(api, clock):
    a = candidate(api, clock, "a")
    assert a.try_acquire_or_renew() and a.leading
    spec = api.objects["lepton-operator"]["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["renewTime"] == spec["acquireTime"] == "2026-01-01T00:16:40.000000Z"
    assert spec["leaseTransitions"] == 0


def test_a_standby_waits_while_the_leader_renews_and_never_compares_clocks(api, clock):
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    assert a.try_acquire_or_renew()
    for _ in range(30):                       # a minute of renewals every 2 s
        assert not b.try_acquire_or_renew()
        clock.advance(2)
        assert a.try_acquire_or_renew()
    assert api.holder() == "a"


def test_a_standby_takes_over_a_lease_unchanged_for_its_duration(api, clock):
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()       # b first sees the record now
    clock.advance(14.9)
    assert not b.try_acquire_or_renew()
    clock.advance(0.2)
    assert b.try_acquire_or_renew() and api.holder() == "b"
    spec = api.objects["lepton-operator"]["spec"]
    assert spec["leaseTransitions"] == 1 and spec["acquireTime"] == spec["renewTime"]
    # The old leader, if it comes back, sees another holder: it has lost and stays out.
    assert not a.try_acquire_or_renew()
    assert a.lost_to == "b" and not a.leading


def test_a_stale_record_first_seen_now_still_waits_a_full_duration(api, clock):
    a = candidate(api, clock, "a")
    assert a.try_acquire_or_renew()
    clock.advance(3600)                       # the leader died an hour ago
    b = candidate(api, clock, "b")
    assert not b.try_acquire_or_renew()       # b's own clock has seen nothing yet
    clock.advance(15.1)
    assert b.try_acquire_or_renew()


def test_of_two_candidates_writing_at_once_one_wins(api, clock):
    a = candidate(api, clock, "a")
    assert a.try_acquire_or_renew()
    b, c = candidate(api, clock, "b"), candidate(api, clock, "c")
    assert not b.try_acquire_or_renew() and not c.try_acquire_or_renew()
    clock.advance(16)                         # a is gone; b and c both read its last record
    stale = api.get("lepton-operator", "lepton-system")
    assert b.try_acquire_or_renew()
    api.get = lambda name, namespace: copy.deepcopy(stale)
    assert not c.try_acquire_or_renew()       # its write carries the old resourceVersion: 409
    assert api.holder() == "b"


def test_a_lost_race_to_create_is_not_leading(api, clock):
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    real_get = api.get
    api.get = lambda name, ns: None           # b read "not found" before a created it
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    api.get = real_get
    assert api.holder() == "a"


def test_a_released_lease_is_taken_at_the_next_attempt(api, clock):
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert a.release()
    spec = api.objects["lepton-operator"]["spec"]
    assert "holderIdentity" not in spec and spec["leaseDurationSeconds"] == 1
    clock.advance(2)
    assert b.try_acquire_or_renew() and api.holder() == "b"
    assert not a.release()                    # no longer the holder: leaves the Lease alone


def test_api_errors_are_failed_attempts_not_exceptions(api, clock):
    a = candidate(api, clock, "a")
    api.failing = True
    assert not a.try_acquire_or_renew()
    api.failing = False
    assert a.try_acquire_or_renew()


def test_the_elector_uses_only_the_verbs_the_chart_grants(api, clock):
    a, b = candidate(api, clock, "a"), candidate(api, clock, "b")
    for attempt in (a, b, a):
        attempt.try_acquire_or_renew()
    a.release()
    b.try_acquire_or_renew()
    assert set(api.verbs) == set(leader.LEASE_VERBS) == {"get", "create", "update"}


def test_timings_must_leave_a_margin():
    leader.LeaseConfig("l", "ns", "a")        # client-go's 15 / 10 / 2
    for bad in ((10, 10, 2), (15, 10, 10), (15, 10, 0)):
        with pytest.raises(ValueError, match="lease duration > renew deadline > retry period"):
            leader.LeaseConfig("l", "ns", "a", *bad)


def test_every_process_gets_its_own_identity():
    a, b = leader.new_identity("lepton-abc"), leader.new_identity("lepton-abc")
    assert a != b and a.startswith("lepton-abc_") and b.startswith("lepton-abc_")


def test_micro_time_is_rfc3339_with_microseconds_in_utc():
    t = dt.datetime(2026, 5, 1, 14, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert leader.micro_time(t) == "2026-05-01T12:00:00.123456Z"


# --- the background loops (real threads, short timings) -------------------------------

FAST = {"lease_duration": 0.9, "renew_deadline": 0.6, "retry_period": 0.1}


def test_a_leader_that_cannot_renew_gives_up_within_its_renew_deadline(api):
    a = candidate(api, time.monotonic, "a", **FAST)
    assert a.acquire()
    lost = threading.Event()
    reasons = []
    a.keep_leading(lambda reason: (reasons.append(reason), lost.set()))
    time.sleep(0.5)
    assert not lost.is_set() and api.holder() == "a"        # renewing keeps it
    api.failing = True
    broke = time.monotonic()
    assert lost.wait(5)
    took = time.monotonic() - broke
    assert took <= FAST["renew_deadline"] + 1.5, took
    assert "not renewed" in reasons[0] and "connection refused" in reasons[0]
    a.stop()


def test_a_leader_whose_request_hangs_gives_up_too(api):
    a = candidate(api, time.monotonic, "a", **FAST)
    assert a.acquire()
    lost = threading.Event()
    a.keep_leading(lambda reason: lost.set())
    hang = threading.Event()
    api.get = lambda name, ns: hang.wait(10) and None       # the API server stops answering
    assert lost.wait(5)
    hang.set()
    a.stop()


def test_a_leader_that_sees_another_holder_stops_at_once(api):
    a = candidate(api, time.monotonic, "a", **FAST)
    assert a.acquire()
    reasons = []
    lost = threading.Event()
    a.keep_leading(lambda reason: (reasons.append(reason), lost.set()))
    api.objects["lepton-operator"]["spec"]["holderIdentity"] = "intruder"
    api.objects["lepton-operator"]["metadata"]["resourceVersion"] += "x"
    assert lost.wait(3)
    assert "held by intruder" in reasons[0]
    a.stop()


def test_acquire_blocks_until_the_lease_is_free_and_stop_ends_it(api):
    slow = {"lease_duration": 30, "renew_deadline": 20, "retry_period": 0.1}   # no expiry in this test
    holder = candidate(api, time.monotonic, "holder", **slow)
    assert holder.try_acquire_or_renew()
    waiting = candidate(api, time.monotonic, "waiting", **slow)
    result = []
    t = threading.Thread(target=lambda: result.append(waiting.acquire()))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()                       # the holder's record is fresh: still waiting
    holder.release()
    t.join(2)
    assert result == [True] and api.holder() == "waiting"

    other = candidate(api, time.monotonic, "other", **slow)
    t = threading.Thread(target=lambda: result.append(other.acquire()))
    t.start()
    time.sleep(0.2)
    other.stop()
    t.join(2)
    assert result == [True, False]


def test_standby_health_answers_then_frees_the_port(api):
    port = _free_port()
    elector = candidate(api, time.monotonic, "a", **FAST)
    health = leader.StandbyHealth(port, elector, host="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
        assert resp.status == 200 and b"standby" in resp.read()
    elector.attempted_at = time.monotonic() - 60           # the candidate stopped trying
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert err.value.code == 503
    health.close()
    import socket
    with socket.socket() as s:                # kopf's liveness endpoint can bind it now
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kube_leases_call_the_kube_module_with_a_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(kube, "get", lambda *a, **kw: calls.append(("get", a, kw)))
    monkeypatch.setattr(kube, "create", lambda *a, **kw: calls.append(("create", a, kw)))
    monkeypatch.setattr(kube, "replace", lambda *a, **kw: calls.append(("replace", a, kw)))
    leases = leader.KubeLeases(timeout=5.0)
    leases.get("l", "ns"), leases.create({"x": 1}), leases.update({"x": 2})
    assert [c[0] for c in calls] == ["get", "create", "replace"]
    assert calls[0][1] == ("coordination.k8s.io/v1", "Lease", "l", "ns")
    assert all(c[2] == {"timeout": 5.0} for c in calls)
    assert kube.path("coordination.k8s.io/v1", "Lease", "ns", "l") == \
        "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l"


# --- settings ---------------------------------------------------------------------------

def test_leader_election_settings_from_env_and_the_downward_api():
    s = config.from_env({})
    assert s.leader_election is False and s.leader_election_name == "lepton-operator"
    assert s.leader_election_namespace == "" and s.leader_election_identity == ""
    s = config.from_env({"LEPTON_LEADER_ELECTION": "true", "POD_NAMESPACE": "lepton-system",
                         "POD_NAME": "lepton-7d9f-x2x"})
    assert s.leader_election and s.leader_election_namespace == "lepton-system"
    assert s.leader_election_identity == "lepton-7d9f-x2x"
    s = config.from_env({"LEPTON_LEADER_ELECTION_NAMESPACE": "ops", "POD_NAMESPACE": "lepton-system"})
    assert s.leader_election_namespace == "ops"             # the explicit setting wins
    for env in ({"LEPTON_LEADER_ELECTION": "maybe"}, {"LEPTON_LEADER_ELECTION_NAME": "Bad_Name"}):
        with pytest.raises(ValueError, match=next(iter(env))):
            config.from_env(env)


def test_leader_elect_flag_alone_means_true():
    from lepton_operator.__main__ import parse_args
    assert parse_args(["--leader-elect"])[1].leader_election is True
    assert parse_args(["--leader-elect=false"])[1].leader_election is False
    assert parse_args(["--leader-elect", "-A"])[1].leader_election is True
    _, s = parse_args(["--leader-elect", "--leader-election-name", "ops-lock",
                       "--leader-election-namespace", "ops"])
    assert (s.leader_election_name, s.leader_election_namespace) == ("ops-lock", "ops")
    with pytest.raises(SystemExit):
        parse_args(["--leader-elect=perhaps"])
