#!/usr/bin/env bash
# System packages the local control plane and the tests need: Prometheus (Debian package),
# openssl, Lua 5.1 (the chart's Argo CD health checks), and what the real node and the
# image builds use: containerd and runc, the CNI plugins, buildah, debootstrap, iptables,
# ipset (kube-router's NetworkPolicy firewall) and conntrack.
# Go and python3 come with the machine. Idempotent; installs nothing when all is present.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v lua5.1 >/dev/null 2>&1 || need+=(lua5.1)      # runs the chart's Argo CD health checks in tests
# The real node (hack/realnode.py) and the image builds (hack/images.py).
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v ipset >/dev/null 2>&1 || need+=(ipset)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing ${need[*]} and no apt-get: install them with your package manager" >&2; exit 1
fi
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
echo "[install-system-deps] apt-get install ${need[*]}"
$sudo apt-get update -qq
# The Debian package would start its own service; the local cluster runs its own instance.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Stop a service instance the package may have started (no-op without an init system).
$sudo service prometheus stop >/dev/null 2>&1 || true
$sudo service containerd stop >/dev/null 2>&1 || true
command -v go >/dev/null 2>&1 || { echo "go is required to build the control plane binaries" >&2; exit 1; }
