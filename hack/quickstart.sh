#!/usr/bin/env bash
# The main job: the operator on the local control plane with the quickstart example.
#   1. start the local control plane (cached binaries; seconds after the first build)
#   2. install the CRDs, and a hostPath PersistentVolume for the example's checkpoint claim
#      (the local cluster has no storage provisioner)
#   3. apply examples/quickstart-leptonjob.yaml
#   4. run the operator; print the job once its workers are Running
# The operator keeps running in the foreground (Ctrl-C stops it; `make cluster-down`
# stops the cluster). QUICKSTART_ONCE=1 exits after the job is shown Running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${LEPTON_CLUSTER_DIR:-$root/.cluster}
python3 hack/localcluster.py up --dir "$dir" >/dev/null
export KUBECONFIG=$dir/kubeconfig PATH=$dir/bin:$PATH
echo "[quickstart] control plane up: export KUBECONFIG=$KUBECONFIG"
kubectl get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu,READY:.status.conditions[?(@.type=="Ready")].status'

kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: quickstart-checkpoints}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: /tmp/lepton-quickstart-checkpoints}
  claimRef: {namespace: default, name: mnist-checkpoints}
YAML
kubectl apply -n default -f examples/quickstart-leptonjob.yaml

log=$dir/logs/operator.log
echo "[quickstart] starting the operator (log: $log)"
prom=$(python3 -c "import json,sys; print('http://127.0.0.1:%d' % json.load(open(sys.argv[1]))['ports']['prometheus'])" "$dir/state.json")
LEPTON_PROMETHEUS_URL=$prom .venv/bin/python -m lepton_operator --all-namespaces --metrics-port 8089 --health-port 8090 >"$log" 2>&1 &
op=$!
trap 'kill $op 2>/dev/null; wait $op 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 120); do
  kill -0 $op 2>/dev/null || { echo "[quickstart] the operator exited:"; tail -30 "$log"; exit 1; }
  phase=$(kubectl get lj mnist-mlp -n default -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [ "$phase" = Running ] && break
  sleep 1
done
kubectl get lj,pods,svc -n default -o wide
[ "$phase" = Running ] || { echo "[quickstart] job did not reach Running (phase: ${phase:-none})"; exit 1; }
echo "[quickstart] LeptonJob mnist-mlp is Running. Try: kubectl scale lj/mnist-mlp --replicas=4"
echo "[quickstart] operator metrics: http://127.0.0.1:8089/metrics"
[ "${QUICKSTART_ONCE:-0}" = 1 ] && exit 0
echo "[quickstart] operator running in the foreground; Ctrl-C to stop"
wait $op
