"""The job's rendezvous store, and the torchrun arguments that point workers at it.

``python -m lepton_trainer.rendezvous --port 29400`` hosts a c10d ``TCPStore`` and serves
until SIGTERM or SIGINT. It runs in its own pod, so the rendezvous state outlives any
worker. Workers join it with ``torchrun_args(...)`` (see trainer_image/README.md for
why each setting is what it is).

Beside the store, on ``--control-port`` (29401), a small HTTP endpoint lets the operator
report workers it has seen go (a pod deleted or failed), so that the survivors form the
next round at once instead of waiting for the lost node's keep-alive to expire::

    POST /v1/forget   {"runId": "<job uid>", "addrs": ["10.1.2.3"], "minNodes": 1}
                      optional "pids": [1234]  (only those agents on those addresses)
    -> 200            {"forgotten": ["10.1.2.3_1234_0"], "round": 7}

The store removes every node of that address from the run's rendezvous state (its
participants, wait list, redundancy list and heartbeats), exactly as torch's own
sanitizer does once a keep-alive expires: when the round was complete and no participant
is left, the next round opens; when it was not, a quorum below ``minNodes`` clears the
round's deadline. :func:`forget` is the client.

The control port is safe to expose on a shared cluster. When the store has a token file
(``--token-file``, by default ``contract.RDZV_TOKEN_FILE``, where the operator mounts the
job's Secret), every request needs ``Authorization: Bearer <token>`` (401 without, 403
with another); without the file it needs none, as a store of an older job. With
``--run-id`` it changes only that run's state (403 for another). A body over
``CONTROL_MAX_BODY`` is refused (413) unread; each connection is served on its own thread
(``CONTROL_MAX_CONNECTIONS`` at once, more are closed), with a socket timeout, so a slow
client holds up nobody else. The state it edits is
unpickled only from the classes torch's ``_RendezvousState`` is made of and checked to be
one (:func:`load_state`): anything else stored under the run's key is refused (422) and
left as it is.

Importing this module does not import torch: the operator's builders import
:func:`torchrun_args` and the constants.
"""
from __future__ import annotations

import argparse
import datetime
import hmac
import io
import json
import logging
import os
import pickle
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from .contract import RDZV_CONTROL_PORT, RDZV_PORT, RDZV_TOKEN_FILE

# torch's own defaults for the c10d rendezvous (dynamic_rendezvous.create_handler). A
# node's agent writes a heartbeat every keep_alive_interval; a node without one for
# interval x keep_alive_max_attempt is dropped from the rendezvous.
DEFAULT_RDZV_CONF: Mapping[str, object] = {
    "join_timeout": 600, "last_call_timeout": 30, "close_timeout": 30,
    "keep_alive_interval": 5, "keep_alive_max_attempt": 3,
}
# What the operator uses. The store lives in its own pod, so no worker may host it
# (is_host=false). last_call_timeout is the wait after min_nodes have joined for
# stragglers; once max_nodes have joined the round completes at once whatever it is.
# A lost node that the operator sees go is removed from the rendezvous at once (the
# store's /v1/forget); the keep-alive covers the losses nobody reports (a partitioned or
# frozen node): 3 s x 3 drops one after about 9 s. read_timeout bounds each store
# operation, the agent's connection to the store included: an agent whose store does not
# answer (its pod reported Ready on a node whose network does not carry it) fails after
# STORE_CONNECT_TIMEOUT seconds, not torch's 60, and says so.
STORE_CONNECT_TIMEOUT = 20
TUNED_RDZV_CONF: Mapping[str, object] = {
    "is_host": "false", "join_timeout": 600, "last_call_timeout": 2, "close_timeout": 10,
    "keep_alive_interval": 3, "keep_alive_max_attempt": 3, "read_timeout": STORE_CONNECT_TIMEOUT,
}

# Environment for every worker container. With torch's default (the agent of group rank
# 0 hosts the process-group store and keeps it across worker-group restarts), a restart
# in which that agent survives re-initialises the process group on a store that still
# holds the previous incarnation's keys, and init_process_group hangs. With sharing off,
# rank 0's worker process hosts a fresh store on a free port for every incarnation.
WORKER_ENV: Mapping[str, str] = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

# The control port: the largest request body it reads (a report names a few addresses),
# and the seconds a client may take over any read or write of its connection.
CONTROL_MAX_BODY = 64 * 1024
CONTROL_TIMEOUT = 10.0
# Connections served at once (a thread each); more are closed at once, unread.
CONTROL_MAX_CONNECTIONS = 128

# What a pickle of torch's rendezvous state (dynamic_rendezvous._RendezvousState) names:
# the state, its nodes, and the datetimes of its deadline and heartbeats.
_DYNAMIC = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"
STATE_CLASSES = frozenset({(_DYNAMIC, "_RendezvousState"), (_DYNAMIC, "_NodeDesc"),
                           ("datetime", "datetime"), ("datetime", "timezone"), ("datetime", "timedelta")})


def rdzv_conf(tuned: bool = True, **overrides: object) -> str:
    """The ``--rdzv-conf`` value: ``key=value`` pairs joined by commas."""
    conf = {**(TUNED_RDZV_CONF if tuned else {"is_host": "false", **DEFAULT_RDZV_CONF}),
            **overrides}
    for key, value in conf.items():
        if key.endswith("_timeout") and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be a non-negative integer (seconds), got {value!r}")
        if key.startswith("keep_alive_") and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return ",".join(f"{k}={v}" for k, v in conf.items())


def torchrun_args(*, endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
                  nproc_per_node: int | str = 1, max_restarts: int = 3,
                  local_addr: str | None = None, tuned: bool = True,
                  **conf_overrides: object) -> list[str]:
    """torchrun options (without the program and the script) for one node agent.

    ``endpoint`` is ``host:port`` of the rendezvous store, ``run_id`` a value unique to
    the job (its uid). ``local_addr`` is the address peers use to reach this node (the
    pod IP): the process-group store and the collectives are served from it.
    """
    if min_nodes < 1 or max_nodes < min_nodes:
        raise ValueError(f"need 1 <= min_nodes <= max_nodes, got {min_nodes}:{max_nodes}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if isinstance(nproc_per_node, int) and nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if not run_id:
        raise ValueError("run_id must not be empty")
    if ":" not in endpoint:
        raise ValueError(f"endpoint must be host:port, got {endpoint!r}")
    args = [
        f"--nnodes={min_nodes}:{max_nodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf={rdzv_conf(tuned, **conf_overrides)}",
        f"--max-restarts={max_restarts}",
    ]
    if local_addr:
        args.append(f"--local-addr={local_addr}")
    return args


class RefusedState(ValueError):
    """What is stored under a run's rendezvous key is not torch's rendezvous state."""


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in STATE_CLASSES:
            raise RefusedState(f"the stored state names {module}.{name}, which torch's rendezvous state never holds")
        return super().find_class(module, name)


def _check_state(state: object) -> None:
    """Raise ``RefusedState`` unless ``state`` is a ``_RendezvousState`` whose fields have
    the types torch gives them."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

    def nodes(items: object) -> bool:
        return all(type(n) is _NodeDesc and isinstance(n.addr, str) and type(n.pid) is int
                   and type(n.local_id) is int for n in items)   # type: ignore[attr-defined]

    if type(state) is not _RendezvousState:
        raise RefusedState(f"the stored state is a {type(state).__name__}, not torch's _RendezvousState")
    fields = vars(state)
    participants, heartbeats = fields.get("participants"), fields.get("last_heartbeats")
    deadline = fields.get("deadline")
    ok = (type(fields.get("round")) is int and type(fields.get("complete")) is bool
          and type(fields.get("closed")) is bool and (deadline is None or isinstance(deadline, datetime.datetime))
          and isinstance(participants, dict) and nodes(participants)
          and all(type(rank) is int for rank in participants.values())
          and all(isinstance(fields.get(k), set) and nodes(fields[k]) for k in ("wait_list", "redundancy_list"))
          and isinstance(heartbeats, dict) and nodes(heartbeats)
          and all(isinstance(t, datetime.datetime) for t in heartbeats.values()))
    if not ok:
        raise RefusedState("the stored state is a _RendezvousState whose fields are not torch's")


def load_state(raw: bytes) -> object:
    """Torch's rendezvous state from its pickle, unpickled only from ``STATE_CLASSES`` and
    checked field by field; ``RefusedState`` for anything else (nothing else is loaded)."""
    try:
        state = _StateUnpickler(io.BytesIO(raw)).load()
    except RefusedState:
        raise
    except Exception as exc:  # noqa: BLE001 (any malformed pickle is refused alike)
        raise RefusedState(f"the stored state is not a pickle of torch's rendezvous state ({exc})") from None
    _check_state(state)
    return state


def forget_nodes(store, run_id: str, addrs: Iterable[str], min_nodes: int,
                 pids: Iterable[int] = ()) -> tuple[list[str], int | None]:
    """Remove the nodes at ``addrs`` (and, when given, with those agent ``pids``) from the
    c10d rendezvous state of ``run_id`` in ``store``: (the nodes removed, the round).

    The state is torch's own (``dynamic_rendezvous._RendezvousState``, pickled by the
    agents), written back with the backend's compare-and-set, so a concurrent update by
    an agent is never lost: on a conflict the change is made again on the new state. What
    is stored is loaded with :func:`load_state`: anything else raises ``RefusedState`` and
    is left unchanged.
    """
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _remove_participant_epilogue

    addrs, pids = set(addrs), set(pids)
    backend = C10dRendezvousBackend(store, run_id)
    for _ in range(20):
        current = backend.get_state()
        if current is None:
            return [], None
        raw, token = current
        state = load_state(raw)
        nodes = set(state.participants) | state.wait_list | state.redundancy_list | set(state.last_heartbeats)
        lost = sorted((n for n in nodes if n.addr in addrs and (not pids or n.pid in pids)), key=str)
        if not lost:
            return [], state.round
        removed_participant = False
        for node in lost:
            removed_participant |= state.participants.pop(node, None) is not None
            state.wait_list.discard(node)
            state.redundancy_list.discard(node)
            state.last_heartbeats.pop(node, None)
        if removed_participant:   # torch's own step after a participant leaves (it reads min_nodes only)
            _remove_participant_epilogue(state, SimpleNamespace(min_nodes=min_nodes))
        result = backend.set_state(pickle.dumps(state), token)
        if result is not None and result[2]:
            return [str(n) for n in lost], state.round
    raise RuntimeError(f"the rendezvous state of {run_id!r} kept changing; nothing was removed")


class _Refusal(Exception):
    """A request the control port answers with ``code`` and does nothing for."""

    def __init__(self, code: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.headers = code, message, dict(headers or {})


class _Control(BaseHTTPRequestHandler):
    timeout = CONTROL_TIMEOUT           # the connection's socket timeout (StreamRequestHandler)
    server: "ControlServer"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        try:
            if self.path != "/v1/forget":
                raise _Refusal(404, f"no such endpoint {self.path!r}")
            self._authorize()
            run_id, addrs, min_nodes, pids = self._report()
            with self.server.lock:
                forgotten, round_ = forget_nodes(self.server.store, run_id, addrs, min_nodes, pids)
        except _Refusal as refusal:
            logging.warning("control: refused POST %s from %s: %d %s", self.path, self.client_address[0],
                            refusal.code, refusal.message)
            return self._reply(refusal.code, {"error": refusal.message}, refusal.headers)
        except RefusedState as exc:
            logging.warning("control: refused POST %s from %s: rendezvous %s left unchanged: %s",
                            self.path, self.client_address[0], run_id, exc)
            return self._reply(422, {"error": f"rendezvous state left unchanged: {exc}"})
        if forgotten:
            logging.info("forgot %s in round %s of rendezvous %s (reported lost)",
                         ", ".join(forgotten), round_, run_id)
        self._reply(200, {"forgotten": forgotten, "round": round_})

    def _authorize(self) -> None:
        """Nothing when the store has no token; else the request's bearer token must be it."""
        token = self.server.token
        if token is None:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _Refusal(401, "a bearer token is required", {"WWW-Authenticate": 'Bearer realm="rendezvous"'})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise _Refusal(403, "the bearer token is not this store's")

    def _report(self) -> tuple[str, list[str], int, list[int]]:
        """(runId, addrs, minNodes, pids) of the request's body, read only when it is small."""
        try:
            size = int(self.headers.get("Content-Length") or "")
        except ValueError:
            raise _Refusal(411, "a Content-Length is required") from None
        if not 0 <= size <= CONTROL_MAX_BODY:
            self.close_connection = True            # the rest of the body is never read
            raise _Refusal(413 if size > 0 else 400, f"the body must be 0..{CONTROL_MAX_BODY} bytes, got {size}")
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            self.close_connection = True
            raise _Refusal(408, f"the body did not arrive within {CONTROL_TIMEOUT:g}s") from None
        try:
            body = json.loads(raw or b"{}")
            run_id, addrs = str(body["runId"]), [str(a) for a in body["addrs"]]
            min_nodes = int(body.get("minNodes", 1))
            pids = [int(p) for p in body.get("pids") or ()]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Refusal(400, f"expected runId, addrs[, minNodes, pids]: {exc}") from None
        if self.server.run_id and run_id != self.server.run_id:
            raise _Refusal(403, "this store serves another rendezvous")
        return run_id, addrs, min_nodes, pids

    def _reply(self, code: int, body: dict, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        logging.debug("control: " + format, *args)


class ControlServer(ThreadingHTTPServer):
    """The control endpoint (``POST /v1/forget``) of ``store``: each connection on a daemon
    thread of its own, at most ``max_connections`` at once (more are closed unread).
    ``token``: the bearer token every request needs (None: none); ``run_id``: the only
    rendezvous it changes (None: any)."""
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store, token: str | None = None, run_id: str | None = None,
                 max_connections: int = CONTROL_MAX_CONNECTIONS):
        super().__init__(address, _Control)
        self.store, self.token, self.run_id = store, token, run_id
        self.lock = threading.Lock()      # one change of the state at a time
        self.max_connections = max_connections
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            logging.warning("control: closed a connection from %s: %d are open already",
                            client_address[0], self.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        logging.warning("control: request from %s failed: %s", client_address[0], sys.exc_info()[1])


def forget(url: str, run_id: str, addrs: Iterable[str], min_nodes: int, pids: Iterable[int] = (),
           timeout: float = 3.0, token: str | None = None) -> dict:
    """Client of ``POST /v1/forget`` (``url``: ``http://host:port``): the store's answer.
    ``token``: the store's bearer token (None: send none, for a store without one)."""
    body = json.dumps({"runId": run_id, "addrs": list(addrs), "minNodes": min_nodes,
                       "pids": list(pids)}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{url}/v1/forget", data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def read_token(path: str | None) -> str | None:
    """The control port's token from ``path``; None when there is no such file. An empty
    file is an error: a store that should require a token never serves without one."""
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise SystemExit(f"the token file {path} is empty")
    return token


def serve(port: int = RDZV_PORT, host: str = "0.0.0.0", control_port: int | None = RDZV_CONTROL_PORT,
          token_file: str | None = RDZV_TOKEN_FILE, run_id: str | None = None) -> None:
    """Host the store on ``port``, and the control endpoint on ``control_port`` (None:
    none), until SIGTERM or SIGINT. The endpoint requires the token in ``token_file`` when
    that file exists, and changes only ``run_id``'s rendezvous when one is given."""
    import torch.distributed as dist

    token = read_token(token_file) if control_port is not None else None
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    logging.info("rendezvous store listening on %s:%d", host, store.port)
    control = None
    if control_port is not None:
        control = ControlServer((host, control_port), store, token, run_id or None)
        threading.Thread(target=control.serve_forever, name="control", daemon=True).start()
        logging.info("control endpoint listening on %s:%d (%s; %s)", host, control.server_port,
                     "bearer token required" if token else f"no token file at {token_file}: no token required",
                     f"rendezvous {run_id} only" if run_id else "any rendezvous")
    print(f"rendezvous store ready on port {store.port}", flush=True)
    received = signal.sigwait(signals)
    logging.info("rendezvous store stopping on %s", signal.Signals(received).name)
    if control is not None:
        control.shutdown()
    del store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lepton_trainer.rendezvous",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=RDZV_PORT)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--control-port", type=int, default=RDZV_CONTROL_PORT,
                        help="port of the HTTP endpoint where lost workers are reported (-1: none)")
    parser.add_argument("--token-file", default=RDZV_TOKEN_FILE,
                        help="file holding the bearer token the control port requires (absent: none required)")
    parser.add_argument("--run-id", default="",
                        help="the only rendezvous id the control port changes (empty: any)")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not -1 <= args.control_port < 65536:
        parser.error(f"--control-port must be in 0..65535, got {args.control_port}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    serve(args.port, args.host, None if args.control_port == -1 else args.control_port,
          args.token_file, args.run_id or None)


if __name__ == "__main__":
    main()
