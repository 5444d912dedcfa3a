"""A real Kubernetes node for the local control plane: kubelet and kube-proxy (built from
the same ``k8s.io/kubernetes`` module as the API server), containerd and runc (Debian),
the CNI bridge and host-local plugins (Debian), CoreDNS for cluster DNS, and a pause
image built here. Pods on it are real containers.

NetworkPolicy is enforced by kube-router in firewall-only mode (``--run-firewall``, no
router, no service proxy: kube-proxy stays the service proxy), with iptables and ipset
(Debian). As NetworkPolicy engines do, it lets the node itself reach every pod, so
kubelet's probes, Prometheus and the tests' clients on the host are not policed; pods
are.

Networking: a bridge, ``lepton0`` with ``10.250.0.1/24`` (kwok's fake pods take
``10.244.0.0/16``), is made before the API server starts. Pods get addresses from that subnet; the host side of the bridge is the node's
IP and the address the API server, Prometheus and CoreDNS listen on, so that pods reach
them (the ``kubernetes`` Service, through kube-proxy's iptables rules) and the host
reaches the pods.

Everything the node makes is recorded and undone by :meth:`RealNode.stop`: processes are
stopped by pid, pods' containers and sandboxes through the kubelet or, when the
control plane is already gone, by killing what is left in the node's cgroup; mounts,
network namespaces, the bridge, iptables chains and kube-router's ipsets, cgroups and the
kernel settings kubelet changes are restored. :func:`leftovers` lists what would remain, for the tests.

Used by ``hack/localcluster.py`` (``up --real-node``); builds on ``hack/common.py`` and
``hack/images.py``; only the standard library is used.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (CONTAINERD_STATE, command_lines, containerd_address, issue_cert, kubeconfig,
                    node_containerds, write_containerd_config)
from images import import_into

BRIDGE = "lepton0"
NODE_IP = "10.250.0.1"
POD_CIDR = "10.250.0.0/24"
NODE_NAME = "lepton-node"
CGROUP_ROOT = "lepton"
NODE_LABEL = "lepton.ai/real-node"
# containerd 1.6's shims keep their sockets here whatever the configured state dir is.
SHIM_DIR = Path("/run/containerd/s")
# Kernel settings kubelet changes at start; restored on stop.
SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
BR_NF = "net/bridge/bridge-nf-call-iptables"
NODE_PROCESSES = ("containerd", "kubelet", "kube-proxy", "kube-router", "coredns", "pod-sd")
# kube-router's ipsets (the pods a NetworkPolicy selects, and its peers).
IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-")
# The chain kube-router's firewall puts in the FORWARD path once it has synced.
KUBE_ROUTER_CHAIN = "KUBE-ROUTER-FORWARD"


def log(msg: str) -> None:
    print(f"[realnode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sh(*argv: str, check: bool = True, capture: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=capture, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout if capture else ""


def unsupported_reason() -> str | None:
    """Why this machine cannot run the real node, or None when it can."""
    if os.geteuid() != 0:
        return "not root (kubelet, containerd and the CNI plugins need root)"
    need = [t for t in ("containerd", "runc", "ctr", "ip", "iptables", "ipset", "buildah") if not shutil.which(t)]
    if not Path("/usr/lib/cni/bridge").exists():
        need.append("CNI plugins in /usr/lib/cni")
    if need:
        return f"missing {', '.join(need)} (hack/install-system-deps.sh installs them)"
    if node_containerds():
        return "another local cluster's real node is running (one per machine: its bridge and image store are shared)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        return "cannot create network namespaces"
    if not Path("/sys/fs/cgroup").exists():
        return "no cgroup filesystem"
    return None


def _read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    try:
        Path("/proc/sys", name).write_text(value)
    except OSError:
        pass


# ---- what a node leaves behind ---------------------------------------------------------
def _mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        out.append(line.split()[4].replace("\\040", " "))
    return out


def _netns() -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _iptables_chains() -> list[str]:
    """KUBE-* and CNI-* chains in every table, IPv4 and IPv6."""
    out = []
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        for table in ("filter", "nat", "mangle"):
            listing = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
            for line in listing.splitlines():
                if line.startswith("-N ") and line.split()[1].startswith(("KUBE-", "CNI-")):
                    out.append(f"{tool}/{table}/{line.split()[1]}")
    return out


def _ipsets() -> list[str]:
    """kube-router's ipsets (``IPSET_PREFIXES``)."""
    if not shutil.which("ipset"):
        return []
    names = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout.split()
    return sorted(n for n in names if n.startswith(IPSET_PREFIXES))


def _cgroup_dirs() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    return sorted(p for p in base.glob(f"*/{CGROUP_ROOT}") if p.is_dir())


def _cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for top in _cgroup_dirs():
        for procs in top.rglob("cgroup.procs"):
            try:
                pids |= {int(x) for x in procs.read_text().split()}
            except OSError:
                pass
    return pids


def _shim_pids(address: str) -> set[int]:
    """containerd-shim processes serving the node's containerd (their command line names
    its socket)."""
    return {pid for pid, cmd in command_lines() if b"containerd-shim" in cmd[0] and address.encode() in cmd}


def leftovers(node_dir: Path) -> dict[str, list[str]]:
    """What a stopped node would have left on the machine: processes in its cgroup or
    shims of its containerd, mounts under its directories, network namespaces made for
    pods, the bridge, KUBE-/CNI- iptables chains (kube-router's too), kube-router's ipsets,
    its cgroups. Empty lists: nothing."""
    dirs = (str(node_dir), str(CONTAINERD_STATE), str(SHIM_DIR))
    address = containerd_address(node_dir)
    link = subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0
    return {
        "processes": sorted(str(p) for p in _cgroup_pids() | _shim_pids(address)),
        "mounts": [m for m in _mounts() if m.startswith(dirs)],
        "netns": [n for n in _netns() if n.startswith("cni-")],
        "links": [BRIDGE] if link else [],
        "iptables": _iptables_chains(),
        "ipsets": _ipsets(),
        "cgroups": [str(p) for p in _cgroup_dirs()],
    }


@dataclass
class RealNode:
    """The node's state lives in ``node_dir``; ``ports`` and ``pids`` are saved by the cluster."""

    node_dir: Path
    pki: Path
    server: str
    cache: Path
    tool_path: object  # callable: tool name -> Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    service_cidr: str = ""   # the cluster's Service range (kube-router's --service-cluster-ip-range)

    @property
    def address(self) -> str:
        return containerd_address(self.node_dir)

    @property
    def kubelet_dir(self) -> Path:
        return self.node_dir / "kubelet"

    # ---- before the control plane -----------------------------------------------------
    @staticmethod
    def make_bridge() -> None:
        """The bridge pods attach to; its address is the node's IP, where the API server
        listens. Made before the API server starts so that it can bind there."""
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        addrs = _sh("ip", "-o", "addr", "show", "dev", BRIDGE)
        if f" {NODE_IP}/" not in addrs:
            _sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")

    # ---- start ------------------------------------------------------------------------
    def start(self, spawn, wait, kubectl, images: dict[str, str], free_port) -> None:
        """Start containerd, import the images, then CoreDNS, kube-proxy and kubelet, and
        once the node is registered kube-router's firewall.

        ``spawn(name, argv)``, ``wait(what, check, timeout, proc)`` and ``kubectl(*args)``
        are the cluster's; ``images`` maps image roles to references."""
        self.node_dir.mkdir(parents=True, exist_ok=True)
        for name in ("kubelet", "kubelet-healthz", "kube-proxy-metrics", "kube-proxy-healthz"):
            self.ports[name] = free_port(set(self.ports.values()))
        pending = self.node_dir / "sysctls.json"  # removed once restored
        if pending.exists():  # a node that was never stopped changed them: keep the originals
            self.saved_sysctls = json.loads(pending.read_text())
        else:
            self.saved_sysctls = {k: v for k in (*SYSCTLS, BR_NF) if (v := _read_sysctl(k)) is not None}
            pending.write_text(json.dumps(self.saved_sysctls))
        (self.node_dir / "sysctls.before.json").write_text(json.dumps(self.saved_sysctls))
        # Pod-to-Service traffic that kube-proxy DNATs back onto the same bridge must pass
        # iptables; the kernel's default leaves bridged frames alone.
        _write_sysctl(BR_NF, "1")
        self._write_cni()
        config = write_containerd_config(self.node_dir, self.cache, images["pause"])
        spawn("containerd", ["containerd", "--config", str(config)])
        wait("containerd", lambda: _sh("ctr", "--address", self.address, "version", check=False) != "",
             60, "containerd")
        import_into(self.address, [images["pause"], images["operator"], images["trainer"]])
        self._write_credentials(kubectl)
        self._start_coredns(spawn)
        self._start_kube_proxy(spawn)
        self._start_kubelet(spawn)
        wait("the real node Ready", lambda: self._ready(kubectl), 180, "kubelet")
        self._start_kube_router(spawn)
        wait("kube-router's NetworkPolicy firewall", self._firewall_ready, 120, "kube-router")

    def _write_cni(self) -> None:
        conf_dir = self.node_dir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-lepton.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "lepton",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.node_dir / "cni" / "ipam")},
            }],
        }, indent=2))

    def _write_credentials(self, kubectl) -> None:
        """Client certificates for kubelet (system:node:<name> in system:nodes), kube-proxy
        and CoreDNS, a serving certificate for kubelet, and CoreDNS's read-only RBAC."""
        issue_cert(self.pki, "kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}")
        issue_cert(self.pki, "kubelet-serving", f"/CN={NODE_NAME}",
                   f"subjectAltName=IP:{NODE_IP},DNS:{NODE_NAME}\nextendedKeyUsage=serverAuth")
        issue_cert(self.pki, "kube-proxy", "/CN=system:kube-proxy")
        issue_cert(self.pki, "coredns", "/CN=lepton:coredns")
        issue_cert(self.pki, "kube-router", "/CN=lepton:kube-router")
        for user in ("kubelet", "kube-proxy", "coredns", "kube-router"):
            (self.node_dir / f"{user}.kubeconfig").write_text(kubeconfig(self.server, self.pki, user))
        kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "lepton:coredns"},
             "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                        "verbs": ["list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                        "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "lepton:coredns"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lepton:coredns"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "lepton:coredns"}]},
            # kube-router's firewall: reads pods, namespaces, policies and its node; its
            # informers also list Services and endpoints, whatever controllers run.
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "lepton:kube-router"},
             "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                        "verbs": ["get", "list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                        "verbs": ["list", "watch"]},
                       {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                        "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "lepton:kube-router"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lepton:kube-router"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "lepton:kube-router"}]},
        ]}))

    def _start_coredns(self, spawn) -> None:
        corefile = self.node_dir / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.node_dir / 'coredns.kubeconfig'} lepton-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 5
}}
""")
        spawn("coredns", [str(self.tool_path("coredns")), "-conf", str(corefile)])

    def _start_kube_proxy(self, spawn) -> None:
        config = self.node_dir / "kube-proxy.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.node_dir / "kube-proxy.kubeconfig")},
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{self.ports['kube-proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.ports['kube-proxy-metrics']}",
            # Leave the machine's conntrack settings and route_localnet as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
            "nodePortAddresses": [f"{NODE_IP}/32"],
        }, indent=2))
        spawn("kube-proxy", [str(self.tool_path("kube-proxy")), "--config", str(config), "--v=1"])

    def _start_kube_router(self, spawn) -> None:
        """kube-router as the node's NetworkPolicy engine only: its firewall controller
        turns each policy into iptables chains and ipsets; routing (BGP) and the service
        proxy stay off (kube-proxy is the proxy). It needs the registered node."""
        spawn("kube-router", [
            str(self.tool_path("kube-router")), "--kubeconfig", str(self.node_dir / "kube-router.kubeconfig"),
            "--hostname-override", NODE_NAME,
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
            "--service-cluster-ip-range", self.service_cidr,
            "--enable-ipv4=true", "--enable-ipv6=false",
            "--health-port=0", "--metrics-port=0", "--iptables-sync-period=1m", "--v=1",
        ])

    @staticmethod
    def _firewall_ready() -> bool:
        return subprocess.run(["iptables", "-w", "-t", "filter", "-S", KUBE_ROUTER_CHAIN],
                              capture_output=True).returncode == 0

    @staticmethod
    def _make_cgroup_root() -> None:
        """kubelet's --cgroup-root must exist in every hierarchy (cgroup v1 here)."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if not hierarchy.is_dir() or not (hierarchy / "cgroup.procs").exists():
                continue
            root = hierarchy / CGROUP_ROOT
            root.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # empty in a new cpuset cgroup
                if (root / name).exists() and not (root / name).read_text().strip():
                    (root / name).write_text((hierarchy / name).read_text())

    def _start_kubelet(self, spawn) -> None:
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self._make_cgroup_root()
        resolv = self.node_dir / "resolv.conf"  # upstream for pods with dnsPolicy Default
        resolv.write_text(f"nameserver {NODE_IP}\n")
        config = self.node_dir / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # This machine has cgroup v1, which kubelet 1.35 refuses unless told otherwise.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}", "cgroupsPerQOS": True,
            "containerRuntimeEndpoint": f"unix://{self.address}",
            "address": NODE_IP, "port": self.ports["kubelet"], "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.ports["kubelet-healthz"],
            "tlsCertFile": str(self.pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(self.pki / "kubelet-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [NODE_IP], "clusterDomain": "cluster.local", "resolvConf": str(resolv),
            "failSwapOn": False, "maxPods": 40, "serializeImagePulls": False,
            "makeIPTablesUtilChains": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
            "registerNode": True, "nodeStatusReportFrequency": "10s",
            "volumePluginDir": str(self.kubelet_dir / "volume-plugins"),
        }, indent=2))
        spawn("kubelet", [
            str(self.tool_path("kubelet")), "--config", str(config),
            "--kubeconfig", str(self.node_dir / "kubelet.kubeconfig"),
            "--root-dir", str(self.kubelet_dir),
            # Without it kubelet writes to /var/lib/kubelet/pki whatever --root-dir says.
            "--cert-dir", str(self.kubelet_dir / "pki"),
            "--hostname-override", NODE_NAME, "--node-ip", NODE_IP,
            "--node-labels", f"{NODE_LABEL}=true", "--v=1",
        ])

    def _ready(self, kubectl) -> bool:
        node = json.loads(kubectl("get", "node", NODE_NAME, "-o", "json", check=False) or "{}")
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in node.get("status", {}).get("conditions", []))

    # ---- stop -------------------------------------------------------------------------
    def drain(self, kubectl) -> None:
        """Delete the node's pods through the API, so that kubelet stops their containers
        and tears down their sandboxes (CNI DEL, network namespace) the normal way."""
        if not kubectl("get", "node", NODE_NAME, "-o", "name", check=False):
            return
        kubectl("cordon", NODE_NAME, check=False)  # controllers' replacements must not land here
        kubectl("delete", "pods", "-A", "--field-selector", f"spec.nodeName={NODE_NAME}",
                "--grace-period=1", "--wait=false", check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = _sh("ctr", "--address", self.address, "-n", "k8s.io", "tasks", "ls", "-q", check=False)
            pods = kubectl("get", "pods", "-A", "--field-selector", f"spec.nodeName={NODE_NAME}", "-o", "name",
                           check=False)
            if not running.strip() and not pods.strip():
                return
            time.sleep(0.5)

    def stop(self, terminate) -> None:
        """Stop the node and remove everything it made. ``terminate(pid)`` is the cluster's.

        The bridge, the cgroup root and the iptables chains are the machine's one node's:
        when another cluster's node runs now (this one was stopped before, and its
        state is stale), they are its, and only this node's own processes are stopped."""
        mine = self.pids.get("containerd")
        for name in ("pod-sd", "kube-router", "kubelet", "kube-proxy", "coredns"):
            terminate(self.pids.pop(name, None))
        if any(pid != mine for pid in node_containerds()):
            terminate(self.pids.pop("containerd", None))
            log("another local cluster's real node is running: its bridge, cgroups and chains are left alone")
            return
        self._kill_containers()
        if "containerd" in self.pids and os.path.exists(self.address):
            ids = _sh("ctr", "--address", self.address, "-n", "k8s.io", "containers", "ls", "-q", check=False).split()
            if ids:
                _sh("ctr", "--address", self.address, "-n", "k8s.io", "containers", "rm", *ids, check=False)
        terminate(self.pids.pop("containerd", None))
        self._kill_containers()
        self.sweep()

    def _kill_containers(self) -> None:
        for _ in range(20):
            pids = _cgroup_pids() | _shim_pids(self.address)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)

    def sweep(self) -> None:
        """Undo what a node made, whether or not it stopped cleanly."""
        self._kill_containers()
        node_mounts = [m for m in _mounts() if m.startswith((str(self.node_dir), str(CONTAINERD_STATE)))]
        for m in sorted(node_mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        for ns in _netns():
            # cni-* namespaces no process uses any more are pods' sandboxes that lost their owner
            if ns.startswith("cni-") and not _sh("ip", "netns", "pids", ns, check=False).strip():
                subprocess.run(["umount", f"/run/netns/{ns}"], capture_output=True)
                Path("/run/netns", ns).unlink(missing_ok=True)
        kube_proxy = self.tool_path("kube-proxy")
        if Path(kube_proxy).exists():
            subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True)
        self._drop_chains()
        for name in _ipsets():   # after the chains: a set a rule still uses cannot go
            subprocess.run(["ipset", "destroy", name], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        for top in _cgroup_dirs():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
            except OSError:
                pass
        shutil.rmtree(CONTAINERD_STATE, ignore_errors=True)
        saved = self.node_dir / "sysctls.json"
        if saved.exists():
            for key, value in json.loads(saved.read_text()).items():
                _write_sysctl(key, value)
            saved.unlink()
        shutil.rmtree(self.node_dir / "cni" / "ipam", ignore_errors=True)

    @staticmethod
    def _drop_chains() -> None:
        """Remove KUBE-* and CNI-* chains (and the jumps to them) that kube-proxy's
        cleanup does not (kubelet's canaries, a killed CNI plugin's, kube-router's)."""
        for tool in ("iptables", "ip6tables"):
            if not shutil.which(tool):
                continue
            for table in ("filter", "nat", "mangle"):
                rules = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
                ours = [line.split()[1] for line in rules.splitlines()
                        if line.startswith("-N ") and line.split()[1].startswith(("KUBE-", "CNI-"))]
                if not ours:
                    continue
                for line in rules.splitlines():
                    parts = shlex.split(line)   # kube-router's rules carry quoted comments
                    if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in ours \
                            and parts[1] not in ours:
                        subprocess.run([tool, "-w", "-t", table, "-D", *parts[1:]], capture_output=True)
                for chain in ours:
                    subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True)
                for chain in ours:
                    subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True)
