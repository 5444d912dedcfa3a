"""The operator's torchrun arguments and the dedicated rendezvous store."""
import re
import signal
import threading
from datetime import timedelta

import pytest

from lepton_trainer import rendezvous
from lepton_trainer.rendezvous import DEFAULT_RDZV_CONF, TUNED_RDZV_CONF, torchrun_args
from torchrun_procs import procs, rdzv_endpoint, start_agent  # noqa: F401 (fixtures)

pytestmark = pytest.mark.trainer

USER_SCRIPT = """\
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print(f"user-script rank={dist.get_rank()} world={dist.get_world_size()} sum={int(t.item())}")
dist.destroy_process_group()
"""


def test_arguments_are_what_the_operator_runs():
    args = torchrun_args(endpoint="job-rdzv:29400", run_id="uid-1", min_nodes=2, max_nodes=4,
                         nproc_per_node=8, max_restarts=5, local_addr="10.0.0.7")
    assert args == [
        "--nnodes=2:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=job-rdzv:29400", "--rdzv-id=uid-1",
        "--rdzv-conf=is_host=false,join_timeout=600,last_call_timeout=2,close_timeout=10,"
        "keep_alive_interval=3,keep_alive_max_attempt=3,read_timeout=20",
        "--max-restarts=5", "--local-addr=10.0.0.7"]
    default = torchrun_args(endpoint="h:1", run_id="x", min_nodes=1, max_nodes=2, tuned=False)
    assert "last_call_timeout=30" in default[5] and "is_host=false" in default[5]
    assert "last_call_timeout=7" in torchrun_args(endpoint="h:1", run_id="x", min_nodes=1,
                                                  max_nodes=2, last_call_timeout=7)[5]
    assert "torch" not in vars(rendezvous)      # the operator imports this without torch


@pytest.mark.parametrize("kwargs,message", [
    ({"min_nodes": 3, "max_nodes": 2}, "min_nodes <= max_nodes"),
    ({"min_nodes": 0}, "min_nodes <= max_nodes"),
    ({"max_restarts": -1}, "max_restarts"),
    ({"nproc_per_node": 0}, "nproc_per_node"),
    ({"run_id": ""}, "run_id"),
    ({"endpoint": "no-port"}, "host:port"),
    ({"last_call_timeout": -1}, "last_call_timeout"),
    ({"keep_alive_interval": 0}, "keep_alive_interval must be a positive integer"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    base = dict(endpoint="h:1", run_id="x", min_nodes=1, max_nodes=2)
    with pytest.raises(ValueError, match=message):
        torchrun_args(**{**base, **kwargs})


@pytest.mark.parametrize("tuned", [True, False])
def test_torchrun_hands_the_settings_to_its_rendezvous_handler(rdzv_endpoint, tuned):
    """Parse the arguments with torchrun's own parser and build the handler it would use,
    connected to the dedicated store as a client."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters, registry
    from torch.distributed.run import config_from_args, parse_args

    args = torchrun_args(endpoint=rdzv_endpoint, run_id=f"settings-{tuned}", min_nodes=2,
                         max_nodes=3, tuned=tuned)
    config, _, _ = config_from_args(parse_args([*args, "train.py"]))
    handler = registry.get_rendezvous_handler(RendezvousParameters(
        backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
        min_nodes=config.min_nodes, max_nodes=config.max_nodes, **config.rdzv_configs))
    conf = TUNED_RDZV_CONF if tuned else DEFAULT_RDZV_CONF
    settings = handler.settings
    assert (settings.min_nodes, settings.max_nodes) == (2, 3)
    assert settings.timeout.last_call == timedelta(seconds=conf["last_call_timeout"])
    assert settings.timeout.join == timedelta(seconds=conf["join_timeout"])
    assert settings.timeout.close == timedelta(seconds=conf["close_timeout"])
    assert settings.keep_alive_interval == timedelta(seconds=conf["keep_alive_interval"])
    assert settings.keep_alive_max_attempt == conf["keep_alive_max_attempt"]
    assert config.rdzv_configs["is_host"] == "false"
    assert handler.get_run_id() == f"settings-{tuned}"


def test_unchanged_user_script_runs_and_store_outlives_the_job(tmp_path, procs, rdzv_endpoint):
    script = tmp_path / "user_train.py"
    script.write_text(USER_SCRIPT)
    for run in ("user-1", "user-2"):            # the store serves one job after another
        agent = start_agent(procs, tmp_path, run, rdzv_endpoint, run, (1, 2), nproc=2,
                            script=[str(script)])
        assert agent.wait() == 0, agent.text()[-3000:]
        found = sorted(re.findall(r"user-script rank=\d world=\d sum=\d", agent.text()))
        assert found == ["user-script rank=0 world=2 sum=3", "user-script rank=1 world=2 sum=3"]
    store = procs[0]
    assert store.popen.poll() is None           # agents came and went, the store is up


def test_store_stops_on_sigterm(tmp_path, procs, rdzv_endpoint):
    store = procs[0]
    store.popen.send_signal(signal.SIGTERM)
    assert store.wait(60) == 0
    assert "stopping on SIGTERM" in store.text()


def _node(endpoint: str, run_id: str, addr: str):
    """A node agent's rendezvous handler, built as torchrun builds it: (min 1, max 2), a
    keep-alive of 10 minutes, so that only a report can drop a node in this test."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters, registry

    return registry.get_rendezvous_handler(RendezvousParameters(
        backend="c10d", endpoint=endpoint, run_id=run_id, min_nodes=1, max_nodes=2, local_addr=addr,
        is_host="false", last_call_timeout=1, keep_alive_interval=60, keep_alive_max_attempt=10))


def _in_thread(fn):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
    thread.start()
    return thread, result


def test_a_reported_node_is_dropped_and_the_survivor_re_forms_without_its_keep_alive(procs, rdzv_endpoint,
                                                                                     monkeypatch):
    """Two nodes form a round; one goes silent (its heartbeats stop, as when its pod is
    deleted). Its keep-alive would drop it after 10 minutes; the report to the store's
    ``/v1/forget`` drops it now, and the survivor's next rendezvous completes with itself
    alone, in a new round."""
    store = procs[0]
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")      # as on the operator's workers
    a, b = _node(rdzv_endpoint, "report", "127.0.0.2"), _node(rdzv_endpoint, "report", "127.0.0.3")
    started = [_in_thread(h.next_rendezvous) for h in (a, b)]
    for thread, _ in started:
        thread.join(60)
    assert [r["value"].world_size for _, r in started] == [2, 2]
    b._stop_heartbeats()                                   # node b is lost

    unknown = rendezvous.forget(store.control_url, "report", ["127.0.0.9"], min_nodes=1)
    assert unknown["forgotten"] == []                      # no node there: nothing changes
    answer = rendezvous.forget(store.control_url, "report", ["127.0.0.3"], min_nodes=1)
    assert len(answer["forgotten"]) == 1 and answer["forgotten"][0].startswith("127.0.0.3_")
    assert re.search(r"forgot 127\.0\.0\.3_\d+_\d+ in round \d+ of rendezvous report", store.text())

    thread, result = _in_thread(a.next_rendezvous)        # what a's agent does when its worker fails
    thread.join(120)
    assert not thread.is_alive(), "the survivor waited for the lost node's keep-alive"
    info = result["value"]
    assert info.world_size == 1 and info.rank == 0
    assert a.get_run_id() == "report"


def test_bad_reports_are_refused_with_a_reason(procs, rdzv_endpoint):
    import urllib.error
    import urllib.request

    store = procs[0]
    request = urllib.request.Request(f"{store.control_url}/v1/forget", data=b'{"addrs": ["x"]}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=10)
    assert bad.value.code == 400 and "runId" in bad.value.read().decode()
    other = urllib.request.Request(f"{store.control_url}/v1/other", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(other, timeout=10)
    assert missing.value.code == 404
    assert store.popen.poll() is None
