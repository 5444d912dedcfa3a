"""The rendezvous store's control port on a shared cluster: a real store process, with the
token file and run id the operator gives it, and real clients (a c10d TCPStore client,
urllib, raw sockets)."""
import datetime
import json
import pickle
import socket
import sys
import threading
import urllib.error
import urllib.request

import pytest

from lepton_trainer import rendezvous
from torchrun_procs import Proc, free_port, procs  # noqa: F401 (fixture)

pytestmark = pytest.mark.trainer

RUN = "0b5e-job-uid"
TOKEN = "s3cret-token-of-the-job"


@pytest.fixture
def store(tmp_path, procs):
    """A store started as the operator starts it: a token file and its job's run id."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port, control = free_port(), free_port()
    proc = Proc([sys.executable, "-m", "lepton_trainer.rendezvous", "--port", str(port), "--control-port",
                 str(control), "--host", "127.0.0.1", "--token-file", str(token_file), "--run-id", RUN],
                tmp_path / "rdzv.log")
    procs.append(proc)
    proc.wait_for(r"rendezvous store ready on port")
    proc.port, proc.control_port = port, control
    proc.url = f"http://127.0.0.1:{control}"
    return proc


def backend(store, run_id: str = RUN):
    """torch's own c10d rendezvous backend of ``run_id``, as an agent holds it."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=30))
    return C10dRendezvousBackend(client, run_id)


def two_nodes_state(*extra_participants):
    """A complete round of two nodes at 10.0.0.1 and 10.0.0.2, as the agents write it."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

    state = _RendezvousState()
    state.round, state.complete = 4, True
    now = datetime.datetime.now(datetime.timezone.utc)
    state.deadline = now
    for rank, addr in enumerate(("10.0.0.1", "10.0.0.2")):
        node = _NodeDesc(addr, 100 + rank, 0)
        state.participants[node] = rank
        state.last_heartbeats[node] = now
    for key, value in extra_participants:
        state.participants[key] = value
    return state


def stored(store, run_id: str = RUN) -> bytes:
    return backend(store, run_id).get_state()[0]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/forget", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def report(run_id: str = RUN, addrs=("10.0.0.2",)) -> bytes:
    return json.dumps({"runId": run_id, "addrs": list(addrs), "minNodes": 1}).encode()


class CreatesAFile:
    """A pickle that, once loaded, creates ``path`` (what an attacker stores under the key)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_report_without_the_jobs_token_changes_nothing_and_with_it_drops_the_node(store):
    backend(store).set_state(pickle.dumps(two_nodes_state()))
    before = stored(store)
    assert post(store.url, report())[0] == 401
    assert post(store.url, report(), {"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert post(store.url, report(), {"Authorization": "Bearer not-the-token"})[0] == 403
    assert post(store.url, report(), {"Authorization": f"Bearer {TOKEN}x"})[0] == 403
    assert stored(store) == before
    assert "refused POST /v1/forget from 127.0.0.1: 403" in store.text()

    answer = rendezvous.forget(store.url, RUN, ["10.0.0.2"], min_nodes=1, token=TOKEN, timeout=30)
    assert answer == {"forgotten": ["10.0.0.2_101_0"], "round": 4}
    state = pickle.loads(stored(store))
    assert [n.addr for n in state.participants] == ["10.0.0.1"]


def test_a_report_for_another_run_is_refused(store):
    backend(store, "another-job").set_state(pickle.dumps(two_nodes_state()))
    before = stored(store, "another-job")
    code, body = post(store.url, report("another-job"), {"Authorization": f"Bearer {TOKEN}"})
    assert code == 403 and "another rendezvous" in body["error"]
    assert stored(store, "another-job") == before


def test_an_oversized_body_is_refused_unread(store):
    with socket.create_connection(("127.0.0.1", store.control_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/forget HTTP/1.1\r\nHost: rdzv\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\n".encode()
                     + f"Content-Length: {rendezvous.CONTROL_MAX_BODY + 1}\r\n\r\n".encode() + b"{" * 1024)
        answer = sock.makefile("rb").readline()
    assert answer.split()[1] == b"413"
    assert "413 the body must be" in store.text() and store.popen.poll() is None


def test_a_slow_client_holds_up_no_other_report(store):
    """Two clients hold connections open (one stops in its headers, one in its body); a
    valid report is answered while both are still open, not after the server gave up on them."""
    backend(store).set_state(pickle.dumps(two_nodes_state()))
    slow_headers = socket.create_connection(("127.0.0.1", store.control_port), timeout=30)
    slow_body = socket.create_connection(("127.0.0.1", store.control_port), timeout=30)
    try:
        slow_headers.sendall(b"POST /v1/forget HTTP/1.1\r\nHost: rdzv\r\n")
        slow_body.sendall(b"POST /v1/forget HTTP/1.1\r\nHost: rdzv\r\n"
                          + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 500\r\n\r\n".encode() + b'{"runId"')
        answer = rendezvous.forget(store.url, RUN, ["10.0.0.2"], min_nodes=1, token=TOKEN, timeout=30)
        assert answer["forgotten"] == ["10.0.0.2_101_0"]
        for sock in (slow_headers, slow_body):        # neither answered nor closed yet
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        slow_headers.close()
        slow_body.close()


@pytest.mark.parametrize("where", ["the whole value", "inside a real state"])
def test_a_malicious_pickle_under_the_rendezvous_key_is_never_loaded(store, tmp_path, where):
    marker = tmp_path / "pwned"
    evil = CreatesAFile(marker)
    value = evil if where == "the whole value" else two_nodes_state((evil, 2))
    backend(store).set_state(pickle.dumps(value))
    before = stored(store)
    code, body = post(store.url, report(), {"Authorization": f"Bearer {TOKEN}"})
    assert code == 422 and ".open, which torch" in body["error"]
    assert not marker.exists()
    assert stored(store) == before
    assert "left unchanged" in store.text() and store.popen.poll() is None


def test_only_torchs_rendezvous_state_is_loaded():
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _RendezvousState

    state = two_nodes_state()
    assert type(rendezvous.load_state(pickle.dumps(state))) is _RendezvousState
    state.round = "4"                                   # the right class, a field of the wrong type
    with pytest.raises(rendezvous.RefusedState, match="fields"):
        rendezvous.load_state(pickle.dumps(state))
    with pytest.raises(rendezvous.RefusedState, match="datetime, not torch's"):
        rendezvous.load_state(pickle.dumps(datetime.datetime.now()))
    with pytest.raises(rendezvous.RefusedState, match="not a pickle"):
        rendezvous.load_state(b"\x80\x04garbage")
    with pytest.raises(rendezvous.RefusedState, match="builtins.eval"):
        rendezvous.load_state(b"cbuiltins\neval\n(S'1'\ntR.")


def test_connections_beyond_the_limit_are_closed_unread_while_the_open_ones_are_served(caplog):
    server = rendezvous.ControlServer(("127.0.0.1", 0), store=None, max_connections=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = ("127.0.0.1", server.server_port)
    try:
        with socket.create_connection(address, timeout=30) as held, \
                socket.create_connection(address, timeout=30) as over:
            held.sendall(b"POST /v1/forget HTTP/1.1\r\n")           # holds the one slot
            assert over.recv(1) == b""                               # closed, nothing read or answered
            held.sendall(b"Host: rdzv\r\nContent-Length: 2\r\n\r\n{}")
            assert held.makefile("rb").readline().split()[1] == b"400"   # the held one is still served
        assert "1 are open already" in caplog.text
    finally:
        server.shutdown()
        server.server_close()
