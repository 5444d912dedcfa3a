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

Importing this module does not import torch: the operator's builders import
:func:`torchrun_args` and the constants.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

from .contract import RDZV_CONTROL_PORT, RDZV_PORT

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
# frozen node): 3 s x 3 drops one after about 9 s.
TUNED_RDZV_CONF: Mapping[str, object] = {
    "is_host": "false", "join_timeout": 600, "last_call_timeout": 2, "close_timeout": 10,
    "keep_alive_interval": 3, "keep_alive_max_attempt": 3,
}

# Environment for every worker container. With torch's default (the agent of group rank
# 0 hosts the process-group store and keeps it across worker-group restarts), a restart
# in which that agent survives re-initialises the process group on a store that still
# holds the previous incarnation's keys, and init_process_group hangs. With sharing off,
# rank 0's worker process hosts a fresh store on a free port for every incarnation.
WORKER_ENV: Mapping[str, str] = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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


def forget_nodes(store, run_id: str, addrs: Iterable[str], min_nodes: int,
                 pids: Iterable[int] = ()) -> tuple[list[str], int | None]:
    """Remove the nodes at ``addrs`` (and, when given, with those agent ``pids``) from the
    c10d rendezvous state of ``run_id`` in ``store``: (the nodes removed, the round).

    The state is torch's own (``dynamic_rendezvous._RendezvousState``, pickled by the
    agents), written back with the backend's compare-and-set, so a concurrent update by
    an agent is never lost: on a conflict the change is made again on the new state.
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
        state = pickle.loads(raw)  # written by the job's own agents, which load it the same way
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


def _control_handler(store, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Control(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/v1/forget":
                return self._reply(404, {"error": f"no such endpoint {self.path!r}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                run_id, addrs = str(body["runId"]), [str(a) for a in body["addrs"]]
                min_nodes = int(body.get("minNodes", 1))
                pids = [int(p) for p in body.get("pids") or ()]
            except (ValueError, KeyError, TypeError) as exc:
                return self._reply(400, {"error": f"expected runId, addrs[, minNodes, pids]: {exc}"})
            with lock:
                forgotten, round_ = forget_nodes(store, run_id, addrs, min_nodes, pids)
            if forgotten:
                logging.info("forgot %s in round %s of rendezvous %s (reported lost)",
                             ", ".join(forgotten), round_, run_id)
            self._reply(200, {"forgotten": forgotten, "round": round_})

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            logging.debug("control: " + format, *args)

    return Control


def forget(url: str, run_id: str, addrs: Iterable[str], min_nodes: int, pids: Iterable[int] = (),
           timeout: float = 3.0) -> dict:
    """Client of ``POST /v1/forget`` (``url``: ``http://host:port``): the store's answer."""
    body = json.dumps({"runId": run_id, "addrs": list(addrs), "minNodes": min_nodes,
                       "pids": list(pids)}).encode()
    request = urllib.request.Request(f"{url}/v1/forget", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve(port: int = RDZV_PORT, host: str = "0.0.0.0", control_port: int | None = RDZV_CONTROL_PORT) -> None:
    """Host the store on ``port``, and the control endpoint on ``control_port`` (None:
    none), until SIGTERM or SIGINT."""
    import torch.distributed as dist

    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    logging.info("rendezvous store listening on %s:%d", host, store.port)
    control = None
    if control_port is not None:
        control = HTTPServer((host, control_port), _control_handler(store, threading.Lock()))
        threading.Thread(target=control.serve_forever, name="control", daemon=True).start()
        logging.info("control endpoint listening on %s:%d", host, control.server_port)
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
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not -1 <= args.control_port < 65536:
        parser.error(f"--control-port must be in 0..65535, got {args.control_port}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    serve(args.port, args.host, None if args.control_port == -1 else args.control_port)


if __name__ == "__main__":
    main()
