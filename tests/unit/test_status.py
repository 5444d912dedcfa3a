"""Condition helpers: transitions, kstatus consistency, observedGeneration."""
import datetime

import pytest

from lepton_operator.core import status as st
from lepton_operator.constants import COND_READY, COND_RECONCILING, COND_STALLED, FALSE, TRUE

pytestmark = pytest.mark.unit

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def by_type(conds):
    return {c["type"]: c for c in conds}


def test_transition_time_moves_only_on_status_change():
    conds = st.set_condition([], COND_READY, FALSE, "CreatingWorkers", "0/2", 1, now=T0)
    same = st.set_condition(conds, COND_READY, FALSE, "WaitingForWorkers", "1/2", 2, now=T1)
    c = by_type(same)[COND_READY]
    assert (c["lastTransitionTime"], c["reason"], c["message"], c["observedGeneration"]) == \
        (T0, "WaitingForWorkers", "1/2", 2)
    flipped = st.set_condition(same, COND_READY, TRUE, "Running", "", 2, now=T1)
    assert by_type(flipped)[COND_READY]["lastTransitionTime"] == T1


def test_set_condition_does_not_mutate_input_and_keeps_others():
    conds = st.set_condition([], "Other", TRUE, "X", now=T0)
    snapshot = [dict(c) for c in conds]
    out = st.set_condition(conds, COND_READY, TRUE, "Running", now=T1)
    assert conds == snapshot
    assert set(by_type(out)) == {"Other", COND_READY}


@pytest.mark.parametrize("kwargs, expected", [
    (dict(ready=True, reason="Running"), (TRUE, FALSE, FALSE)),
    (dict(ready=False, reason="CreatingWorkers"), (FALSE, TRUE, FALSE)),
    (dict(ready=False, stalled=True, reason="InvalidSpec"), (FALSE, FALSE, TRUE)),
])
def test_set_health_is_kstatus_consistent(kwargs, expected):
    conds = by_type(st.set_health([], observed_generation=3, now=T0, message="m", **kwargs))
    assert tuple(conds[t]["status"] for t in (COND_READY, COND_RECONCILING, COND_STALLED)) == expected
    assert all(c["observedGeneration"] == 3 for c in conds.values())
    assert all(c["reason"] == kwargs["reason"] for c in conds.values())


def test_set_health_rejects_ready_and_stalled():
    with pytest.raises(ValueError, match="both ready and stalled"):
        st.set_health([], ready=True, stalled=True, reason="x")


def test_set_condition_rejects_bad_status():
    with pytest.raises(ValueError, match="True, False or Unknown"):
        st.set_condition([], COND_READY, "yes", "x")


def test_time_roundtrip_and_status_diff():
    assert st.now_iso(st.parse_time(T0)) == T0
    assert st.parse_time(None) is None
    assert st.merge_patch({"phase": "Pending", "a": 1, "b": 2}, {"phase": "Running", "a": 1}) == {"phase": "Running", "b": None}


def test_progress_is_a_normal_event_and_what_needs_a_person_a_warning():
    def cond(type_, status, reason):
        return {"type": type_, "status": status, "reason": reason, "message": "m"}
    events = st.transition_events([], [cond("Compressed", "False", "Compressing"),
                                       cond("SourceAvailable", "False", "WaitingForSource")])
    assert [e[0] for e in events] == ["Normal", "Normal"]
    events = st.transition_events([], [cond("Compressed", "False", "CompressionPodPending"),
                                       cond("SourceAvailable", "False", "SourceNotFound")])
    assert [e[0] for e in events] == ["Warning", "Warning"]


def test_every_write_is_stamped_and_a_steady_status_only_once_per_heartbeat():
    """``reconciledAt`` rides along with each write; a status that did not change costs no
    write until its stamp is a heartbeat old, so its age tells whether anyone reconciles."""
    t0 = st.parse_time(T0)
    at = lambda seconds: t0 + datetime.timedelta(seconds=seconds)   # noqa: E731
    first = {"phase": "Running"}
    assert st.stamped({}, first, 60, now=t0) == {"phase": "Running", "reconciledAt": T0}
    old = dict(first)
    steady = {"phase": "Running"}                       # a planner that did not copy the stamp
    assert st.stamped(old, steady, 60, now=at(59)) == {} and steady["reconciledAt"] == T0
    assert st.heartbeat_due_in(old, 60, now=at(59)) == 1
    changed = {**old, "phase": "Scaling"}
    assert st.stamped(old, changed, 60, now=at(30)) == {"phase": "Scaling", "reconciledAt": "2026-01-01T00:00:30Z"}
    due = dict(old)
    assert st.stamped(old, due, 60, now=at(60)) == {"reconciledAt": "2026-01-01T00:01:00Z"}
    assert st.heartbeat_due_in({}, 60) == 0 and st.heartbeat_due_in({"reconciledAt": "garbage"}, 60) == 0
