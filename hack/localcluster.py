#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, without Docker.

Starts etcd, kube-apiserver (TLS, client certificates, service-account signing keys,
RBAC, audit log), kube-controller-manager, kube-scheduler, kwok with fake GPU nodes
(tainted and labelled as NVIDIA's GPU nodes are) and, when there is no real node, one fake
node without GPUs for the pods that ask for none, and Prometheus, each as a plain process
on a free port. The binaries come from
``hack/build-tools.sh`` (built once per version into ``~/.cache/lepton-operator``);
Prometheus comes from the machine (Debian package ``prometheus``).

With ``--real-node`` (the default where the machine can run containers) a real node
joins beside the kwok GPU nodes: kubelet, kube-proxy, containerd, the CNI bridge and
CoreDNS (hack/realnode.py), running the images hack/images.py builds. The API server
and Prometheus then listen on the node's bridge address instead of loopback, so that
pods reach them.

Command line::

    python3 hack/localcluster.py up [--dir .cluster] [--gpu-nodes 2] [--gpus-per-node 8]
                                    [--real-node auto|on|off]
    python3 hack/localcluster.py down [--dir .cluster]
    python3 hack/localcluster.py status [--dir .cluster]

Library (used by the pytest fixture in tests/conftest.py)::

    cluster = Cluster(state_dir).start()
    cluster.kubectl("get", "nodes")
    cluster.stop()

Only the Python standard library is used, so the script runs before any virtualenv
exists.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images  # noqa: E402
import realnode  # noqa: E402
from common import CACHE, HACK, ROOT, issue_cert, kubeconfig, openssl, versions  # noqa: E402

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.0.0.0/18"     # 16,382 ClusterIPs: a rendezvous Service per job, for bench/jobs.py at 5,000 jobs
PROCESS_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "prometheus")
LOOPBACK = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[localcluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tool_path(name: str) -> Path:
    """The cached binary for a tool at its pinned version (built by build-tools.sh)."""
    v = versions()
    if name == "pause":
        return images.pause_binary()
    version = {"etcd": v["ETCD_VERSION"], "kwok": v["KWOK_VERSION"], "helm": v["HELM_VERSION"],
               "coredns": v["COREDNS_VERSION"], "kube-router": v["KUBE_ROUTER_VERSION"]}.get(name, v["K8S_VERSION"])
    return CACHE / "bin" / f"{name}-{version}"


def ensure_tools(real_node: bool = False) -> None:
    """Build whatever binary is missing; a no-op once the cache is warm."""
    names = ["etcd", "kwok", "helm", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"]
    if real_node:
        names += ["kubelet", "kube-proxy", "kube-router", "coredns", "pause"]
    missing = [n for n in names if not tool_path(n).exists()]
    if missing:
        log(f"building missing tools: {', '.join(missing)}")
        subprocess.run(["bash", str(HACK / "build-tools.sh"), "all"], check=True)
    if not shutil.which("prometheus"):
        raise RuntimeError("prometheus is not installed: run hack/install-system-deps.sh "
                           "(Debian package 'prometheus')")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(taken: set[int] = frozenset()) -> int:
    """A free loopback port below the kernel's ephemeral range, so that no outgoing
    connection (the API server's to etcd, Prometheus' scrapes) can take it between
    choosing it and the component binding it."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_pki(pki: Path) -> None:
    """CA, API server serving cert, client certs and the service-account key pair."""
    if (pki / "done-v2").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "3650", "-subj", "/CN=lepton-local-ca", cwd=pki)
    san = (f"subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:{realnode.NODE_IP},DNS:localhost,DNS:kubernetes,"
           "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
    clients = {
        "apiserver": ("/CN=kube-apiserver", san),
        "admin": ("/O=system:masters/CN=lepton-admin", None),
        "controller-manager": ("/CN=system:kube-controller-manager", None),
        "scheduler": ("/CN=system:kube-scheduler", None),
        "kwok": ("/O=system:masters/CN=kwok", None),
        # the API server's client identity towards kubelets (logs, exec, port-forward)
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", None),
    }
    for name, (subject, ext) in clients.items():
        issue_cert(pki, name, subject, ext)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    (pki / "done-v2").write_text("ok\n")


def gpu_node(name: str, gpus: int, cpu: str = "64", memory: str = "512Gi") -> dict:
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64", "type": "kwok",
                                GPU_NODE_LABEL: "true"}},
        "spec": {"taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def cpu_node(name: str, cpu: str = "1000", memory: str = "4Ti", kubelet_port: int | None = None) -> dict:
    """A kwok node without GPUs, where pods that ask for none (rendezvous stores, servers,
    compression) run when there is no real node; large, so that capacity is the GPU nodes'
    question. With ``kubelet_port`` its kubelet is kwok's server on loopback: the API server
    reaches it for pod logs (a test names the file kwok serves with a Logs object)."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "10000"}
    status: dict = {"capacity": capacity, "allocatable": capacity}
    if kubelet_port is not None:
        status.update(addresses=[{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
                      daemonEndpoints={"kubeletEndpoint": {"Port": kubelet_port}})
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64", "type": "kwok"}},
        "status": status,
    }


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [
        # Requests by the control plane's own components are noise for our measurements.
        {"level": "None", "users": ["system:kube-controller-manager", "system:kube-scheduler", "kwok",
                                    "system:apiserver"]},
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system", "system:nodes"]},
        {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*", "/version", "/openapi*"]},
        {"level": "Metadata"},
    ],
}


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl command; its message carries kubectl's own error."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {(self.stderr or self.stdout or '').strip()[-2000:]}"


@dataclass
class Cluster:
    """A local control plane whose state (ports, pids, PKI, logs) lives in ``state_dir``."""

    state_dir: Path
    gpu_node_count: int = 2
    gpus_per_node: int = 8
    scrape_interval: str = "1s"
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    real_node: bool = False
    images: dict[str, str] = field(default_factory=dict)
    # seconds: "images" (build or cache check), "real_node" (start to Ready), "up" (all)
    timings: dict[str, float] = field(default_factory=dict)

    # ---- paths -------------------------------------------------------------------------
    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> str:
        return str(self.state_dir / "kubeconfig")

    @property
    def audit_log(self) -> str:
        return str(self.state_dir / "logs" / "audit.log")

    @property
    def host(self) -> str:
        """Where the API server and Prometheus listen: loopback, or the real node's
        bridge address, which pods reach too."""
        return realnode.NODE_IP if self.real_node else LOOPBACK

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.ports['kube-apiserver']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.ports['prometheus']}"

    @property
    def node(self) -> "realnode.RealNode":
        return realnode.RealNode(self.state_dir / "node", self.pki, self.server, CACHE, tool_path,
                                 self.ports, self.pids, service_cidr=SERVICE_CIDR)

    @property
    def process_names(self) -> tuple[str, ...]:
        return PROCESS_ORDER + (realnode.NODE_PROCESSES if self.real_node else ())

    @property
    def gpu_nodes(self) -> list[str]:
        return [f"kwok-gpu-{i}" for i in range(self.gpu_node_count)]

    @property
    def cpu_nodes(self) -> list[str]:
        """The kwok node without GPUs, where there is no real node to run CPU-only pods."""
        return [] if self.real_node else ["kwok-cpu-0"]

    @property
    def bin_dir(self) -> Path:
        return self.state_dir / "bin"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Cluster":
        t0 = time.monotonic()
        ensure_tools(self.real_node)
        if self.real_node:
            self.images = images.build_all()
            self.timings["images"] = round(time.monotonic() - t0, 1)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.bin_dir.mkdir(exist_ok=True)
        for name in ("kubectl", "helm", "kwok", "etcd", "kube-apiserver", "kube-controller-manager",
                     "kube-scheduler"):
            link = self.bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(tool_path(name))
        make_pki(self.pki)
        for name in ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                     "kwok", "prometheus"):
            self.ports[name] = free_port(set(self.ports.values()))
        for user in ("admin", "controller-manager", "scheduler", "kwok"):
            (self.state_dir / f"{user}.kubeconfig").write_text(kubeconfig(self.server, self.pki, user))
        shutil.copy(self.state_dir / "admin.kubeconfig", self.kubeconfig)
        try:
            if self.real_node:
                realnode.RealNode.make_bridge()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
            self._create_nodes()
            self._register_cluster_apis()
            self._start_kwok()
            self.start_prometheus()
            self._wait_nodes_ready()
            if self.real_node:
                t1 = time.monotonic()
                self.node.start(self._spawn, self._wait, self.kubectl, self.images, free_port)
                self.timings["real_node"] = round(time.monotonic() - t1, 1)
                log(f"real node {realnode.NODE_NAME} Ready in {self.timings['real_node']}s")
                self._start_pod_discovery()
            self._wait_default_service_account("default")
        except BaseException:
            self.stop()
            raise
        self.timings["up"] = round(time.monotonic() - t0, 1)
        self.save()
        log(f"cluster up in {self.timings['up']}s")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        logf = open(self.state_dir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.state_dir)
        self.pids[name] = proc.pid
        self.save()

    def _wait(self, what: str, check, timeout: float = 120.0, proc: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc and not _alive(self.pids.get(proc)):
                tail = (self.state_dir / "logs" / f"{proc}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{proc} exited while waiting for {what}:\n{tail}")
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.state_dir}/logs")

    def _start_etcd(self, fresh: bool = True) -> None:
        data = self.state_dir / "etcd"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn("etcd", [str(tool_path("etcd")), "--name", "default", "--data-dir", str(data),
                             "--listen-client-urls", client, "--advertise-client-urls", client,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"default={peer}", "--unsafe-no-fsync",
                             "--log-level", "warn"])
        self._wait("etcd", lambda: _http_ok(f"{client}/health"), proc="etcd")

    def _start_apiserver(self) -> None:
        pki = self.pki
        policy = self.state_dir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        self._spawn("kube-apiserver", [
            str(tool_path("kube-apiserver")),
            "--etcd-servers", f"http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address", self.host, "--advertise-address", self.host,
            "--secure-port", str(self.ports["kube-apiserver"]),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            "--kubelet-client-certificate", str(pki / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(pki / "apiserver-kubelet-client.key"),
            "--kubelet-certificate-authority", str(pki / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--allow-privileged=true",
            "--audit-policy-file", str(policy), "--audit-log-path", self.audit_log,
            "--audit-log-format", "json", "--audit-log-maxsize", "200",
            "--profiling=false", "--v=1",
        ])
        ctx = self.ssl_context()
        self._wait("kube-apiserver /readyz",
                   lambda: _http_ok(f"{self.server}/readyz", ctx), proc="kube-apiserver", timeout=180)

    def _start_controller_manager(self) -> None:
        cfg = str(self.state_dir / "controller-manager.kubeconfig")
        self._spawn("kube-controller-manager", [
            str(tool_path("kube-controller-manager")),
            "--kubeconfig", cfg, "--authentication-kubeconfig", cfg, "--authorization-kubeconfig", cfg,
            "--bind-address", "127.0.0.1", "--secure-port", str(self.ports["kube-controller-manager"]),
            "--leader-elect=false", "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(self.pki / "sa.key"),
            "--root-ca-file", str(self.pki / "ca.crt"),
            "--cluster-signing-cert-file", str(self.pki / "ca.crt"),
            "--cluster-signing-key-file", str(self.pki / "ca.key"),
            "--controllers", "*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
            "--concurrent-gc-syncs", "20", "--v=1",
        ])

    def _start_scheduler(self) -> None:
        cfg = str(self.state_dir / "scheduler.kubeconfig")
        self._spawn("kube-scheduler", [
            str(tool_path("kube-scheduler")),
            "--kubeconfig", cfg, "--authentication-kubeconfig", cfg, "--authorization-kubeconfig", cfg,
            "--bind-address", "127.0.0.1", "--secure-port", str(self.ports["kube-scheduler"]),
            "--leader-elect=false", "--v=1",
        ])

    def _create_nodes(self) -> None:
        nodes = {"apiVersion": "v1", "kind": "List",
                 "items": [gpu_node(n, self.gpus_per_node) for n in self.gpu_nodes]
                 + [cpu_node(n, kubelet_port=self.ports["kwok"]) for n in self.cpu_nodes]}
        self.kubectl("apply", "-f", "-", input=json.dumps(nodes))

    def _register_cluster_apis(self) -> None:
        """The APIs a production cluster's add-ons serve and the operator uses: the cluster
        autoscaler's ProvisioningRequest (hack/crds/)."""
        for crd in sorted((HACK / "crds").glob("*.yaml")):
            self.kubectl("apply", "--server-side", "-f", str(crd))

    def _start_kwok(self) -> None:
        """kwok, its kubelet server on loopback with the API server's certificate (valid for
        127.0.0.1, signed by the cluster's CA, which the API server checks kubelets against),
        serving the container logs that Logs objects name."""
        self.kubectl("apply", "--server-side", "-f", str(HACK / "kwok-logs-crd.yaml"))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/logs.kwok.x-k8s.io")
        self._spawn("kwok", [
            str(tool_path("kwok")), "--kubeconfig", str(self.state_dir / "kwok.kubeconfig"),
            "--config", str(HACK / "kwok.yaml"),
            "--server-address", f"127.0.0.1:{self.ports['kwok']}",
            "--tls-cert-file", str(self.pki / "apiserver.crt"), "--tls-private-key-file", str(self.pki / "apiserver.key"),
            "--enable-crds", "Logs",
        ])

    def start_prometheus(self) -> None:
        """(Re)start Prometheus on its port, scraping the file-discovered targets every second."""
        targets = self.state_dir / "prometheus" / "targets"
        targets.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "scrape_configs": [{"job_name": "lepton", "file_sd_configs": [
                {"files": [str(targets / "*.json")], "refresh_interval": "1s"}]}],
        }
        (self.state_dir / "prometheus" / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self._spawn("prometheus", [
            shutil.which("prometheus") or "prometheus",
            "--config.file", str(self.state_dir / "prometheus" / "prometheus.yml"),
            "--storage.tsdb.path", str(self.state_dir / "prometheus" / "data"),
            "--web.listen-address", f"{self.host}:{self.ports['prometheus']}",
            "--storage.tsdb.retention.time", "2h", "--log.level", "warn",
        ])
        self._wait("prometheus", lambda: _http_ok(f"{self.prometheus_url}/-/ready"), proc="prometheus")

    def _start_pod_discovery(self) -> None:
        """Prometheus scrapes real pods annotated ``prometheus.io/scrape``, found through
        the API server by hack/podsd.py (Debian's Prometheus has no Kubernetes discovery)."""
        self._spawn("pod-sd", [
            sys.executable, str(HACK / "podsd.py"), "--server", self.server, "--ca", str(self.pki / "ca.crt"),
            "--cert", str(self.pki / "admin.crt"), "--key", str(self.pki / "admin.key"),
            "--out", str(self.state_dir / "prometheus" / "targets" / "pods.json")])

    def stop_prometheus(self) -> None:
        _terminate(self.pids.pop("prometheus", None))
        self.save()

    def add_scrape_target(self, name: str, address: str, labels: dict[str, str] | None = None) -> None:
        """Have Prometheus scrape ``address`` (host:port, /metrics) with extra target labels."""
        path = self.state_dir / "prometheus" / "targets" / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [address], "labels": labels or {}}]))
        os.replace(tmp, path)

    def remove_scrape_target(self, name: str) -> None:
        (self.state_dir / "prometheus" / "targets" / f"{name}.json").unlink(missing_ok=True)

    def _wait_nodes_ready(self) -> None:
        def ready() -> bool:
            names = self.gpu_nodes + self.cpu_nodes
            nodes = [n for n in json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
                     if n["metadata"]["name"] in names]
            return len(nodes) == len(names) and all(
                any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                for n in nodes)
        self._wait("kwok nodes Ready", ready, proc="kwok")

    def _wait_default_service_account(self, namespace: str) -> None:
        self._wait(f"service account {namespace}/default",
                   lambda: self.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False) != "",
                   proc="kube-controller-manager")

    def crash_and_restart(self, name: str) -> None:
        """SIGKILL one control-plane process, as a crash would end it, and start it again on
        the same port with the same state (etcd keeps its data). For fault tests."""
        starters = {"etcd": lambda: self._start_etcd(fresh=False), "kube-apiserver": self._start_apiserver}
        pid = self.pids.pop(name)
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        _terminate(pid, grace=10.0)     # reaps it
        port = self.ports["etcd" if name == "etcd" else name]
        self._wait(f"{name}'s port {port} to be released", lambda: not port_open(port), timeout=30)
        starters[name]()

    def install_crds(self) -> None:
        """Apply the repository's CRDs (crds/, the single source) and wait until each is
        Established."""
        for crd in sorted((ROOT / "crds").glob("*.yaml")):
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
            self.wait_established("-f", str(crd))

    def wait_established(self, *ref: str, timeout: float = 120.0) -> None:
        """Wait until the CRD named by ``ref`` (``crd/<name>``, or ``-f file``) is Established.
        Polled rather than ``kubectl wait``: that fails at once on a CRD whose status has no
        conditions yet (the API server has not processed it), instead of waiting."""
        self._wait(f"CRD {' '.join(ref)} to be Established", lambda: self.kubectl(
            "get", *ref, "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}',
            check=False).strip() == "True", timeout=timeout)

    def create_namespace(self, name: str) -> str:
        """Create a namespace and wait until its default service account exists, so pods can be created."""
        self.kubectl("create", "namespace", name)
        self._wait_default_service_account(name)
        return name

    def stop(self) -> None:
        if self.real_node:
            node = self.node
            if _alive(self.pids.get("kube-apiserver")) and _alive(self.pids.get("kubelet")):
                node.drain(lambda *a, **kw: self.kubectl(*a, **kw))
            node.stop(_terminate)
        for name in reversed(PROCESS_ORDER):
            _terminate(self.pids.pop(name, None))
        self.save()

    # ---- clients -----------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """Run kubectl against this cluster; returns stdout ('' on failure when check=False)."""
        proc = subprocess.run([str(tool_path("kubectl")), "--kubeconfig", self.kubeconfig, *args],
                              input=input, capture_output=True, text=True)
        if proc.returncode != 0:
            if check:
                raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
            return ""
        return proc.stdout

    def api_client(self):
        """A ``kubernetes.client.ApiClient`` for the admin user (needs the kubernetes package)."""
        from kubernetes import config
        return config.new_client_from_config(config_file=self.kubeconfig)

    def audit_requests(self, username: str | None = None) -> list[dict]:
        """Requests recorded in the API server's audit log (one dict per request, at the
        ResponseComplete stage), optionally only those made by ``username``. Requests by
        the control plane's own components are not recorded (see AUDIT_POLICY)."""
        out = []
        try:
            lines = Path(self.audit_log).read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete":
                continue
            if username is None or event.get("user", {}).get("username") == username:
                out.append(event)
        return out

    # ---- state file --------------------------------------------------------------------
    def save(self) -> None:
        if not self.state_dir.exists():
            return
        (self.state_dir / "state.json").write_text(json.dumps({
            "ports": self.ports, "pids": self.pids, "gpu_node_count": self.gpu_node_count,
            "gpus_per_node": self.gpus_per_node, "scrape_interval": self.scrape_interval,
            "real_node": self.real_node, "images": self.images, "timings": self.timings,
            # for scripts (hack/quickstart-real.sh); recomputed from the ports on load
            "prometheus_url": self.prometheus_url if "prometheus" in self.ports else ""}, indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> "Cluster":
        state = json.loads((state_dir / "state.json").read_text())
        return cls(state_dir, state["gpu_node_count"], state["gpus_per_node"], state["scrape_interval"],
                   state["ports"], state["pids"], state.get("real_node", False), state.get("images", {}),
                   state.get("timings", {}))

    def running(self) -> dict[str, bool]:
        return {name: _alive(self.pids.get(name)) for name in self.process_names}

    def rss_bytes(self) -> int:
        """Resident memory summed over the control plane's processes."""
        total = 0
        for pid in self.pids.values():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _terminate(pid: int | None, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``grace``."""
    if not pid or not _alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except OSError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=os.environ.get("LEPTON_CLUSTER_DIR", str(ROOT / ".cluster")),
                        help="state directory (default: .cluster in the repository)")
    parser.add_argument("--gpu-nodes", type=int, default=int(os.environ.get("LEPTON_GPU_NODES", 2)))
    parser.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("LEPTON_GPUS_PER_NODE", 8)))
    parser.add_argument("--real-node", choices=["auto", "on", "off"],
                        default=os.environ.get("LEPTON_REAL_NODE", "auto"),
                        help="a real node (kubelet + containerd) beside the kwok GPU nodes; "
                             "auto: where this machine can run containers")
    args = parser.parse_args(argv)
    state_dir = Path(args.dir).resolve()

    if args.command == "up":
        if (state_dir / "state.json").exists():
            old = Cluster.load(state_dir)
            if all(old.running().values()):
                log(f"already running; export KUBECONFIG={old.kubeconfig}")
                return 0
            old.stop()
        real = args.real_node != "off"
        reason = realnode.unsupported_reason() if real else "--real-node off"
        if reason and args.real_node == "on":
            log(f"cannot start the real node: {reason}")
            return 1
        if reason:
            log(f"starting without a real node ({reason}): pods on the kwok nodes run nothing")
        cluster = Cluster(state_dir, args.gpu_nodes, args.gpus_per_node, real_node=reason is None).start()
        if cluster.real_node:
            print(f"# real node: {realnode.NODE_NAME} ({realnode.NODE_IP}); images: "
                  f"{cluster.images['operator']}, {cluster.images['trainer']}")
        print(f"export KUBECONFIG={cluster.kubeconfig}\n"
              f"export PATH={cluster.bin_dir}:$PATH   # kubectl, helm, kwok at the pinned versions\n"
              f"# Prometheus: {cluster.prometheus_url}\n"
              f"# stop with: make cluster-down")
        return 0
    if not (state_dir / "state.json").exists():
        log(f"no cluster state in {state_dir}")
        return 0 if args.command == "down" else 1
    cluster = Cluster.load(state_dir)
    if args.command == "down":
        cluster.stop()
        if cluster.real_node:
            left = {k: v for k, v in realnode.leftovers(cluster.node.node_dir).items() if v}
            if left:
                log(f"left behind: {left}")
                return 1
        left = [n for n, up in cluster.running().items() if up]
        log("stopped" if not left else f"still running: {left}")
        return 1 if left else 0
    for name, up in cluster.running().items():
        print(f"{name:26s} {'running' if up else 'stopped'}  port {cluster.ports.get(name, '-')}")
    print(f"KUBECONFIG={cluster.kubeconfig}")
    return 0 if all(cluster.running().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
