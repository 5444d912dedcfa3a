"""A real ``python -m lepton_trainer.serve`` subprocess on loopback ports, for the tests."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from lepton_trainer import contract
from _models import PYTHON, env, free_port

MODEL = "digits"


class Server:
    def __init__(self, model_dir: Path, log_path: Path, *args: str, name: str = MODEL):
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.name = log_path, name
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "lepton_trainer.serve", "--model-dir", str(model_dir), "--model-name", name,
             "--host", "127.0.0.1", "--port", str(self.port), "--grpc-port", str(self.grpc_port), *args],
            env=env(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def infer(self, body, name: str | None = None, **kw) -> requests.Response:
        name = name or self.name
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(f"{self.url}/v2/models/{name}/infer", data=data, timeout=30, **kw)

    def metrics(self) -> dict[str, float]:
        """Samples of our metric families, keyed by sample name plus its distinguishing label."""
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(self.get(contract.METRICS_PATH).text):
            for s in fam.samples:
                extra = s.labels.get("code") or s.labels.get("le") or s.labels.get("reason")
                out[s.name + (f"[{extra}]" if extra else "")] = s.value
                assert s.labels.get(contract.METRICS_MODEL_LABEL) == self.name
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def wait_until(cond, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (requests.ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _starter(log_dir: Path):
    servers: list[Server] = []

    def _start(model_dir: Path, *args: str, ready: bool = True, name: str = MODEL,
               timeout: float = 60.0) -> Server:
        srv = Server(model_dir, log_dir / f"server{len(servers)}.log", *args, name=name)
        servers.append(srv)
        wait_until(lambda: srv.proc.poll() is not None or srv.get(contract.HEALTH_LIVE_PATH).ok,
                   what="the server to be live", timeout=timeout)
        if ready:
            wait_until(lambda: srv.get(contract.HEALTH_READY_PATH).status_code == 200, what="ready", timeout=timeout)
        return srv
    return _start, servers


