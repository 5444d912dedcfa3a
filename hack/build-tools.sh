#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy, once per version.
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   kubelet, kube-proxy (the real node)                               <- k8s.io/kubernetes
#   etcd                                                              <- go.etcd.io/etcd/server/v3
#   kwok                                                              <- sigs.k8s.io/kwok
#   helm                                                              <- helm.sh/helm/v3
#   coredns (the real node's cluster DNS)                             <- github.com/coredns/coredns
#   kube-router (the real node's NetworkPolicy engine, firewall only) <- github.com/cloudnativelabs/kube-router/v2
#   pause (the real node's sandbox process)                           <- hack/pause
#   kstatus (Flux's health verdict, for tests/chart/test_kstatus.py)  <- hack/kstatus
#   training-operator (Kubeflow's, the peer in bench/jobs.py; only     <- github.com/kubeflow/training-operator
#     built when asked: `hack/build-tools.sh training-operator`)
# Results land in $LEPTON_CACHE/bin/<tool>-<version>; a second run builds nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${LEPTON_CACHE:-$HOME/.cache/lepton-operator}
BIN=$CACHE/bin
mkdir -p "$BIN" "$CACHE/build"
export GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false" CGO_ENABLED=0
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

log() { printf '[build-tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

have() { [ -x "$BIN/$1-$2" ]; }

# k8s.io/kubernetes is not meant to be a dependency: its go.mod replaces every
# k8s.io/<staging> module with a path inside its own tree. A scratch module that
# replaces each of them with its published v0.x release makes `go build` work.
build_kubernetes() {
  local v=$K8S_VERSION staging="v0${K8S_VERSION#v1}" need=()
  for t in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    have "$t" "$v" || need+=("$t")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  local dir=$CACHE/build/kubernetes-$v
  mkdir -p "$dir"
  log "fetching k8s.io/kubernetes@$v module metadata"
  local gomod
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module lepton.local/k8s-build"
    echo
    echo "go 1.25.0"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" |
      awk -v s="$staging" '{print "replace " $1 " => " $1 " " s}'
  } > "$dir/go.mod"
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  log "resolving dependencies for k8s.io/kubernetes@$v (first time: a few minutes)"
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true; cd "$dir" && go mod download)
  for t in "${need[@]}"; do
    log "go build $t@$v (first time: several minutes per binary on 2 cores)"
    (cd "$dir" && go build -tags tools -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitVersion=$v" \
      -o "$BIN/$t-$v.tmp" "k8s.io/kubernetes/cmd/$t")
    mv "$BIN/$t-$v.tmp" "$BIN/$t-$v"
    log "built $BIN/$t-$v"
  done
}

build_etcd() {
  have etcd "$ETCD_VERSION" && return 0
  local dir=$CACHE/build/etcd-$ETCD_VERSION
  mkdir -p "$dir"
  printf 'module lepton.local/etcd-build\n\ngo 1.25.0\n' > "$dir/go.mod"
  log "go build etcd@$ETCD_VERSION"
  (cd "$dir" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 &&
    go build -ldflags "-s -w" -o "$BIN/etcd-$ETCD_VERSION.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN/etcd-$ETCD_VERSION.tmp" "$BIN/etcd-$ETCD_VERSION"
}

go_install() { # name version package
  have "$1" "$2" && return 0
  log "go install $3@$2"
  local gobin=$CACHE/build/gobin-$1-$2
  GOBIN=$gobin go install -ldflags "-s -w" "$3@$2"
  mv "$gobin/$1" "$BIN/$1-$2"
}

build_kube_router() {
  go_install kube-router "$KUBE_ROUTER_VERSION" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
}

# The pod sandbox's process, versioned by its source's hash.
build_pause() {
  local v
  v=$(sha256sum "$here/pause/main.go" | cut -c1-12)
  have pause "$v" && return 0
  log "go build pause ($v)"
  (cd "$here/pause" && go build -ldflags "-s -w" -o "$BIN/pause-$v.tmp.$$" .)
  mv "$BIN/pause-$v.tmp.$$" "$BIN/pause-$v"
}

# The kstatus helper (sigs.k8s.io/cli-utils), versioned by the hash of its sources:
# hack/kstatus/*.go in C sort order, then go.mod (hack/kstatus_tool.py computes the same).
build_kstatus() {
  local v
  v=$(cd "$here/kstatus" && { printf '%s\n' *.go | LC_ALL=C sort | xargs cat; cat go.mod; } | sha256sum | cut -c1-12)
  have kstatus "$v" && return 0
  log "go build kstatus ($v)"
  (cd "$here/kstatus" && go build -ldflags "-s -w" -o "$BIN/kstatus-$v.tmp.$$" .)
  mv "$BIN/kstatus-$v.tmp.$$" "$BIN/kstatus-$v"
}

# Kubeflow's training-operator v1 (PyTorchJob), the peer bench/jobs.py measures beside ours.
# Not part of `all`: nothing but that benchmark needs it.
build_training_operator() {
  local v=$TRAINING_OPERATOR_VERSION
  have training-operator "$v" && return 0
  log "go install github.com/kubeflow/training-operator/cmd/training-operator.v1@$v"
  local gobin=$CACHE/build/gobin-training-operator-$v
  GOBIN=$gobin go install -ldflags "-s -w" "github.com/kubeflow/training-operator/cmd/training-operator.v1@$v"
  mv "$gobin/training-operator.v1" "$BIN/training-operator-$v"
}

main() {
  local only=${1:-all}
  case $only in
    all) build_etcd; go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
         go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm; build_kubernetes
         go_install coredns "$COREDNS_VERSION" github.com/coredns/coredns; build_kube_router; build_pause
         build_kstatus ;;
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    kwok) go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok ;;
    helm) go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm ;;
    coredns) go_install coredns "$COREDNS_VERSION" github.com/coredns/coredns ;;
    kube-router) build_kube_router ;;
    pause) build_pause ;;
    kstatus) build_kstatus ;;
    training-operator) build_training_operator ;;
    *) echo "usage: $0 [all|kubernetes|etcd|kwok|helm|coredns|kube-router|pause|kstatus|training-operator]" >&2; exit 2 ;;
  esac
  log "tools ready in $BIN"
}
main "$@"
