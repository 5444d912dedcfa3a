#!/usr/bin/env bash
# The main job: the operator on the local control plane with the quickstart example.
#
# With the real node (where this machine can run containers; hack/realnode.py):
#   1. start the local control plane and the real node, building the images (cached)
#   2. helm install the chart: the operator runs in-cluster from its image, with the
#      local Prometheus as its Prometheus
#   3. apply examples/quickstart-cpu.yaml (a hostPath PersistentVolume backs its claim)
#      and print training progress (step, loss, workers) until the job succeeds
#   4. the LeptonModel compresses the job's output, serves it, and a curl command gets a
#      prediction from the Service
# Without it (kwok GPU nodes only; pods there run nothing):
#   1-3 as before with examples/quickstart-leptonjob.yaml; the operator runs as a local
#   process and the job is shown Running.
# LEPTON_REAL_NODE=off forces the second path. QUICKSTART_ONCE=1 exits at the end instead
# of keeping the local operator in the foreground (kwok path).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${LEPTON_CLUSTER_DIR:-$root/.cluster}
python3 hack/localcluster.py up --dir "$dir" --real-node "${LEPTON_REAL_NODE:-auto}" >/dev/null
export KUBECONFIG=$dir/kubeconfig PATH=$dir/bin:$PATH
echo "[quickstart] control plane up: export KUBECONFIG=$KUBECONFIG"
kubectl get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu,READY:.status.conditions[?(@.type=="Ready")].status'
state() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$dir/state.json" "$1"; }

if [ "$(state 's.get("real_node", False)')" = True ]; then
  exec bash hack/quickstart-real.sh
fi
echo "[quickstart] no real node on this machine (see the log line above): kwok path, pods run nothing"
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
