"""What the local-cluster scripts share: the repository's paths, the tool cache, the
pinned versions, the cluster's certificates and kubeconfigs, and the real node's
containerd (its configuration and finding running ones).

The lowest of ``hack/``'s modules: :mod:`images` builds on it, :mod:`realnode` on both,
:mod:`localcluster` on all three; it imports none of them. Only the standard library
is used.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

HACK = Path(__file__).resolve().parent
ROOT = HACK.parent
CACHE = Path(os.environ.get("LEPTON_CACHE", Path.home() / ".cache" / "lepton-operator"))

CONTAINERD_STATE = Path("/run/lepton-containerd")


def versions() -> dict[str, str]:
    """hack/versions.env as a dict."""
    out = {}
    for line in (HACK / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


# ---- certificates and kubeconfigs ---------------------------------------------------------
def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def issue_cert(pki: Path, name: str, subject: str, ext: str | None = None) -> None:
    """``<name>.crt``/``.key`` signed by the cluster's CA; a client certificate unless
    ``ext`` (an openssl extension file's text) says otherwise."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject, cwd=pki)
    extfile = pki / f"{name}.ext"
    extfile.write_text((ext or "extendedKeyUsage=clientAuth") + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", str(extfile), cwd=pki)


def kubeconfig(server: str, pki: Path, user: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lepton-local",
        "clusters": [{"name": "lepton-local", "cluster": {
            "server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(pki / f"{user}.crt"), "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "lepton-local", "context": {"cluster": "lepton-local", "user": user}}],
    }, indent=2)


# ---- the real node's containerd ---------------------------------------------------------
def containerd_address(node_dir: Path) -> str:
    """The socket of the containerd configured in ``node_dir``."""
    return str(node_dir / "containerd.sock")


def write_containerd_config(node_dir: Path, cache: Path, pause: str, state: Path = CONTAINERD_STATE) -> Path:
    """Write ``node_dir/containerd.toml`` and return its path: the image store under
    ``cache`` (it outlives clusters; containers do not), runtime state in ``state``, the
    CRI with ``pause`` as its sandbox image and the CNI configuration under ``node_dir``."""
    root = cache / "containerd"
    root.mkdir(parents=True, exist_ok=True)
    address = containerd_address(node_dir)
    config = node_dir / "containerd.toml"
    config.write_text(f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.opt", "io.containerd.grpc.v1.cri.v1alpha2"]
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # No CAP_SYS_RESOURCE here: containers may not lower their oom_score_adj below ours.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{node_dir / 'cni' / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
""")
    return config


def command_lines():
    """(pid, argv as bytes) of every process."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0]:
            yield int(proc.name), cmd


def node_containerds() -> list[int]:
    """Pids of running containerds started from a node's configuration (they share the
    image store under the cache)."""
    return [pid for pid, cmd in command_lines()
            if cmd[0].endswith(b"containerd") and any(a.endswith(b"/containerd.toml") for a in cmd)]
