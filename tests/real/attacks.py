"""Attacks on a job's rendezvous pod from pods that are not the job's (tests/real).

The real node enforces NetworkPolicy with kube-router in firewall-only mode
(hack/realnode.py). An attacker pod runs the trainer image (which has python) with none of
a job's labels; :class:`Attacks` runs one attempt at a time in it through ``kubectl exec``
and keeps what happened, which :meth:`Attacks.save` writes to bench/results/security.json
(the latest outcome of each attack: one kept from an earlier run where this run did not try
it, each with the time it was tried; the file's other sections stay, bench/security.py).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from realenv import localcluster, security

OUTSIDE_NS = "outsider"
REFUSED = ("refused", "timed out")     # what a policy's REJECT or DROP looks like to a client

# Run inside an attacker pod: one attempt, its outcome printed as a word or two.
ATTEMPT = r"""
import socket, sys, urllib.error, urllib.request
kind, target = sys.argv[1], sys.argv[2]
def attempt():
    try:
        if kind == "tcp":
            host, port = target.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=5).close()
            return "connected"
        body = sys.argv[3].encode() if len(sys.argv) > 3 else None
        req = urllib.request.Request(target, data=body, method="POST" if kind == "post" else "GET",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return f"http {r.status}"
    except urllib.error.HTTPError as e:
        return f"http {e.code}"
    except (socket.timeout, TimeoutError):
        return "timed out"
    except ConnectionRefusedError:
        return "refused"
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            return "timed out"
        if isinstance(e.reason, ConnectionRefusedError):
            return "refused"
        return f"error {e.reason}"
    except OSError as e:
        return f"error {e}"
print(attempt())
"""


def attacker_pod(image: str, ns: str, name: str) -> dict:
    """A pod of ``image`` that only waits, labelled ``app: attacker`` (no job's labels)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "attacker"}},
            "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "attacker", "image": image, "imagePullPolicy": "IfNotPresent",
                                     "command": ["python", "-c", "import time; time.sleep(100000)"],
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "readOnlyRootFilesystem": True,
                                                         "capabilities": {"drop": ["ALL"]}}}]}}


class Attacks:
    """Runs attempts from attacker pods (``(namespace, pod)``) and keeps them."""

    def __init__(self, c, pods: list[tuple[str, str]]) -> None:
        self.c = c
        self.pods = pods
        self.done: list[dict] = []

    def run(self, where: tuple[str, str], attack: str, target: str, kind: str, url: str, body: str = "") -> str:
        """One attempt: ``kind`` tcp (``url`` is host:port), get or post; its outcome."""
        ns, pod = where
        args = ["exec", "-n", ns, pod, "--", "python", "-c", ATTEMPT, kind, url] + ([body] if body else [])
        outcome = self.c.kubectl(*args, check=False).strip() or "no answer from kubectl exec"
        self.done.append({"attack": attack, "target": target, "from": f"{ns}/{pod}", "url": url,
                          "outcome": outcome, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return outcome

    def save(self) -> None:
        def key(a: dict) -> tuple:
            return a["attack"], a["target"], a["from"]
        tried = {key(a) for a in self.done}
        results = security.RESULT
        earlier = json.loads(results.read_text()).get("attacks", []) if results.exists() else []
        version = localcluster.versions()["KUBE_ROUTER_VERSION"]
        security.update({
            "engine": f"kube-router {version}, firewall only (--run-firewall=true --run-router=false "
                      "--run-service-proxy=false), on the real node",
            "policies": "the jobs' defaults (spec.networkPolicy unset)",
            "attacks": [a for a in earlier if key(a) not in tried] + self.done})
