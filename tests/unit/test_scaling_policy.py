"""The pure scaling policy: Knative-style windows for inference, goodput for training."""

import math

import pytest

from lepton_operator.scaling import policy as P

pytestmark = pytest.mark.unit


def run(pol, ticks, current=1, state=None, follow=True):
    """Feed (time, value) ticks; the size follows each decision when ``follow``."""
    state = state or P.InferenceState()
    out = []
    for t, v in ticks:
        d, state = P.decide_inference(pol, state, t, v, current)
        out.append(d)
        if follow:
            current = d.replicas
    return out, state, current


# --- inference -------------------------------------------------------------------------


def test_steady_load_sizes_to_target():
    pol = P.InferencePolicy(target=10, min_replicas=1, max_replicas=20)
    out, _, cur = run(pol, [(t, 45.0) for t in range(0, 60, 2)], current=5)
    assert cur == 5 and all(d.replicas == 5 for d in out)
    assert out[-1].reason == P.STABLE
    assert out[-1].inputs["stableAverage"] == 45.0


def test_stable_window_averages_a_gradual_rise():
    pol = P.InferencePolicy(target=10, max_replicas=50, stable_window=60, panic_window=6)
    # 30 samples at 10 rps then one at 40: the 60 s average moves, the size follows slowly.
    ticks = [(t, 10.0) for t in range(0, 60, 2)] + [(60, 40.0)]
    out, _, _ = run(pol, ticks, current=1)
    last = out[-1]
    assert last.inputs["wantStable"] == math.ceil((29 * 10 + 40) / 30 / 10)
    assert last.replicas == 2   # not 4: one high sample does not move the stable average much


def test_panic_scales_up_fast_on_burst():
    pol = P.InferencePolicy(target=10, max_replicas=50, stable_window=60, panic_window=6)
    ticks = [(t, 10.0) for t in range(0, 60, 2)] + [(60, 100.0), (62, 100.0)]
    out, state, cur = run(pol, ticks, current=1)
    assert out[-2].reason == P.PANIC and out[-2].inputs["panic"] is True
    # The 6 s panic window holds 3 quiet samples and the burst: ceil(32.5 / 10) = 4, while
    # the stable window alone asks for 2. One tick later the panic average is 55: 6.
    assert (out[-2].replicas, out[-2].inputs["wantStable"]) == (4, 2)
    assert (out[-1].replicas, out[-1].reason) == (6, P.PANIC)
    assert state.panic_since == 60


def test_panic_never_scales_down_until_a_stable_window_passes():
    pol = P.InferencePolicy(target=10, max_replicas=50, stable_window=20, panic_window=4,
                            scale_down_delay=0)
    burst = [(t, 100.0) for t in range(0, 6, 2)]
    quiet = [(t, 1.0) for t in range(6, 60, 2)]
    out, state, _ = run(pol, burst + quiet, current=1)
    sizes = [d.replicas for d in out]
    peak = max(sizes)
    assert peak == 10
    last_over = 0  # from t=2 on, 10 replicas no longer fall short by the panic threshold
    # Inside the panic (until last_over + stable window) the size never drops.
    for (t, _), d in zip(burst + quiet, out):
        if t < last_over + 20:
            assert d.replicas == peak and d.reason == P.PANIC, (t, d)
    # Afterwards it leaves panic and falls back to the stable recommendation.
    assert out[-1].reason == P.STABLE and out[-1].replicas == 1
    assert state.panic_since is None


def test_scale_down_is_stabilised():
    pol = P.InferencePolicy(target=10, max_replicas=50, stable_window=10, panic_window=2,
                            scale_down_delay=30)
    high = [(t, 50.0) for t in range(0, 20, 2)]
    low = [(t, 10.0) for t in range(20, 80, 2)]
    out, _, _ = run(pol, high + low, current=5)
    by_t = {t: d for (t, _), d in zip(high + low, out)}
    # The stable average drops below 5 replicas' worth once the window holds low samples,
    # but the size stays at the highest recommendation of the last 30 s.
    assert by_t[30].replicas == 5 and by_t[30].reason == P.STABILIZING
    assert by_t[78].replicas == 1 and by_t[78].reason == P.STABLE
    first_down = min(t for t, d in by_t.items() if d.replicas < 5)
    assert first_down >= 20 + 30 - 10  # not before the delay has covered the high recommendations


def test_bounds_clamp_and_say_so():
    pol = P.InferencePolicy(target=1, min_replicas=2, max_replicas=4, panic_threshold=1000)
    out, _, _ = run(pol, [(0, 100.0)], current=2)
    assert out[0].replicas == 4 and out[0].reason == P.BOUNDED
    out, _, _ = run(pol, [(0, 0.0)], current=2)
    assert out[0].replicas == 2 and out[0].reason == P.BOUNDED


@pytest.mark.parametrize("missing", [None, float("nan"), -1.0])
def test_no_data_holds_and_never_scales_down(missing):
    pol = P.InferencePolicy(target=10, max_replicas=50, scale_down_delay=0)
    out, state, cur = run(pol, [(0, 80.0)], current=8)
    for t in range(2, 200, 2):
        d, state2 = P.decide_inference(pol, state, t, missing, cur)
        assert d.replicas == 8 and d.reason == P.NO_DATA
        assert state2 is state


def test_non_additive_metric_is_proportional():
    pol = P.InferencePolicy(target=0.2, additive=False, max_replicas=20, panic_threshold=10)
    # p95 latency 0.4 s on 3 replicas with a 0.2 s target: double the replicas.
    d, _ = P.decide_inference(pol, P.InferenceState(), 0, 0.4, 3)
    assert d.replicas == 6
    d, _ = P.decide_inference(pol, P.InferenceState(), 0, 0.1, 4)
    assert d.replicas == 2


@pytest.mark.parametrize("kw,msg", [
    (dict(target=0), "target must be > 0"),
    (dict(target=1, min_replicas=3, max_replicas=2), "minReplicas <= maxReplicas"),
    (dict(target=1, panic_window=90, stable_window=60), "panic window"),
    (dict(target=1, panic_threshold=1), "panic threshold"),
])
def test_inference_policy_rejects_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        P.InferencePolicy(**kw)


# --- training ----------------------------------------------------------------------------


def tp(**kw):
    kw = {"min_workers": 1, "max_workers": 8, "efficiency": 0.8, "cooldown": 60, **kw}
    return P.TrainingPolicy(**kw)


def test_goodput_scales_up_while_efficiency_holds_and_stops_when_it_drops():
    pol = tp()
    state = P.TrainingState(last_scale=0)
    per_worker = {1: 100.0, 2: 95.0, 3: 90.0, 4: 60.0}  # the 4th worker hurts goodput
    cur, t, history = 1, 0, []
    for _ in range(12):
        t += 61
        d, state = P.decide_training(pol, state, t, per_worker[cur] * cur, cur, cur, free_gpus=16)
        history.append((cur, d.replicas, d.reason))
        cur = d.replicas
    assert [h for h in history if h[0] != h[1]] == [(1, 2, P.GOODPUT_HOLDS), (2, 3, P.GOODPUT_HOLDS),
                                                    (3, 4, P.GOODPUT_HOLDS)]
    assert cur == 4 and history[-1][2] == P.GOODPUT_DROPPED
    assert state.baseline == 100.0 and state.baseline_workers == 1
    assert history[-1][1] == 4


def test_cooldown_between_scale_events():
    pol = tp(cooldown=120)
    state = P.TrainingState(last_scale=0)
    d, s2 = P.decide_training(pol, state, 100, 100.0, 1, 1, 8)
    assert d.replicas == 1 and d.reason == P.COOLDOWN and d.inputs["cooldownLeft"] == 20
    d, s2 = P.decide_training(pol, state, 121, 100.0, 1, 1, 8)
    assert d.replicas == 2 and s2.last_scale == 121
    d, _ = P.decide_training(pol, s2, 200, 200.0, 2, 2, 8)
    assert d.reason == P.COOLDOWN


def test_bounded_by_free_gpus():
    pol = tp(gpus_per_worker=2, step=3, cooldown=0)
    s = P.TrainingState(baseline=100.0, baseline_workers=1)
    assert P.decide_training(pol, s, 0, 200.0, 2, 2, free_gpus=3)[0].replicas == 3
    d, _ = P.decide_training(pol, s, 0, 200.0, 2, 2, free_gpus=1)
    assert d.replicas == 2 and d.reason == P.NO_CAPACITY
    assert P.decide_training(pol, s, 0, 200.0, 2, 2, free_gpus=None)[0].reason == P.NO_CAPACITY
    assert P.decide_training(pol, s, 0, 200.0, 2, 2, free_gpus=100)[0].replicas == 5
    assert P.decide_training(tp(max_workers=3, step=4, cooldown=0), s, 0, 200.0, 2, 2, 100)[0].replicas == 3


def test_training_no_data_and_unsettled_hold():
    pol = tp(cooldown=0)
    s = P.TrainingState(baseline=100.0, baseline_workers=1)
    for v in (None, float("nan")):
        d, s2 = P.decide_training(pol, s, 0, v, 4, 4, 8)
        assert (d.replicas, d.reason, s2) == (4, P.NO_DATA, s)
    d, _ = P.decide_training(pol, s, 0, 400.0, 4, 3, 8)
    assert (d.replicas, d.reason) == (4, P.NOT_SETTLED)


def test_training_out_of_bounds_is_corrected_and_at_max_holds():
    pol = tp(min_workers=2, max_workers=4, cooldown=0)
    assert P.decide_training(pol, P.TrainingState(), 0, 10.0, 1, 1, 8)[0].replicas == 2
    assert P.decide_training(pol, P.TrainingState(), 0, 10.0, 6, 6, 8)[0].replicas == 4
    d, _ = P.decide_training(pol, P.TrainingState(), 0, 400.0, 4, 4, 8)
    assert (d.replicas, d.reason) == (4, P.AT_MAX)



@pytest.mark.parametrize("kw", [dict(min_workers=0), dict(min_workers=3, max_workers=2),
                                dict(efficiency=0), dict(efficiency=1.5), dict(step=0)])
def test_training_policy_rejects_bad_parameters(kw):
    with pytest.raises(ValueError):
        tp(**kw)
