#!/usr/bin/env bash
# Creates .venv and installs the project with its extras. Idempotent: a second run
# only checks that everything is already there. pip keeps its download cache, so the
# large torch wheels are fetched once per machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
extras=${LEPTON_EXTRAS:-trainer,test,dev}
venv=$root/.venv
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup-python] creating $venv"
  "$py" -m venv "$venv"
fi
stamp=$venv/.lepton-installed
want=$(cat "$root/pyproject.toml" <(echo "$extras") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup-python] $venv is up to date"
  exit 0
fi
echo "[setup-python] installing lepton-operator[$extras] (torch is large: the first install takes minutes)"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
"$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e "$root[$extras]"
echo "$want" > "$stamp"
echo "[setup-python] done"
