#!/usr/bin/env bash
# The quickstart on the local cluster's real node (called by hack/quickstart.sh once the
# cluster is up): the Helm-installed operator trains examples/quickstart-cpu.yaml on real
# containers, then compresses and serves the model and asks it for a prediction with curl.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${LEPTON_CLUSTER_DIR:-$root/.cluster}
export KUBECONFIG=$dir/kubeconfig PATH=$dir/bin:$PATH
state() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$dir/state.json" "$1"; }
say() { echo "[quickstart $(date +%H:%M:%S)] $*"; }
operator=$(state 's["images"]["operator"]') trainer=$(state 's["images"]["trainer"]')
prometheus=$(state 's["prometheus_url"]')
say "real node: images $operator and $trainer"

say "helm install: the operator runs in-cluster (Prometheus: $prometheus)"
helm upgrade --install lepton charts/lepton-operator -n lepton-system --create-namespace --wait --timeout 5m \
  --set image.repository="${operator%:*}" --set image.tag="${operator##*:}" \
  --set trainerImage="$trainer" --set prometheus.url="$prometheus" >/dev/null
kubectl get pods -n lepton-system -o wide

volume=$dir/volumes/mnist-cpu
mkdir -p "$volume" && chmod 0777 "$volume"   # the pods' user (the image's) writes here
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: quickstart-cpu}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: $volume}
  claimRef: {namespace: default, name: mnist-cpu}
YAML
kubectl apply -n default -f examples/quickstart-cpu.yaml

say "training (kubectl logs -f mnist-cpu-worker-0 shows every line)"
last=""
for _ in $(seq 1 600); do
  phase=$(kubectl get lj mnist-cpu -o jsonpath='{.status.phase}' 2>/dev/null || true)
  workers=$(kubectl get lj mnist-cpu -o jsonpath='{.status.workersReady}' 2>/dev/null || true)
  line=$(kubectl logs mnist-cpu-worker-0 --tail=50 2>/dev/null | grep -o 'event=step step=[0-9]* loss=[0-9.]* world=[0-9]*' | tail -1 || true)
  if [ -n "$line" ] && [ "$line" != "$last" ]; then
    say "phase=${phase:-Pending} workers=${workers:-0} ${line#event=step }"; last=$line
  fi
  case "$phase" in Succeeded) break ;; Failed) kubectl describe lj mnist-cpu; exit 1 ;; esac
  sleep 2
done
[ "$phase" = Succeeded ] || { say "the job did not finish (phase: ${phase:-none})"; kubectl describe lj mnist-cpu; exit 1; }
say "LeptonJob mnist-cpu Succeeded; checkpoints and the model are in $volume"

say "LeptonModel mnist-cpu: compressing (int8, accuracy gate) and serving"
for _ in $(seq 1 300); do
  phase=$(kubectl get lm mnist-cpu -o jsonpath='{.status.phase}' 2>/dev/null || true)
  case "$phase" in Ready) break ;; Failed) kubectl describe lm mnist-cpu; exit 1 ;; esac
  sleep 2
done
[ "$phase" = Ready ] || { say "the model is not Ready (phase: ${phase:-none})"; kubectl describe lm mnist-cpu; exit 1; }
kubectl get lm mnist-cpu

ip=$(kubectl get svc mnist-cpu -o jsonpath='{.spec.clusterIP}')
.venv/bin/python - "$dir/request.json" <<'PY'
import json, sys
from lepton_trainer import data
split = data.load_digits()
x, y = split.x_test[:1], int(split.y_test[0])
json.dump({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.flatten().tolist()}]},
          open(sys.argv[1], "w"))
print(f"[quickstart] request: the first held-out digit (label {y})")
PY
cmd="curl -s -H 'Content-Type: application/json' -d @$dir/request.json http://$ip:8080/v2/models/mnist-cpu/infer"
say "prediction: $cmd"
eval "$cmd" | python3 -c "import json,sys; r=json.load(sys.stdin); print({o['name']: o['data'] for o in r['outputs'] if o['name'] == 'predicted_class'})"
say "done: the model serves at http://$ip:8080 (Service mnist-cpu); make cluster-down stops everything"
