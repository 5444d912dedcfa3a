#!/usr/bin/env bash
# Creates the virtualenv that bench/serving.py runs KServe's model server from, and
# prints its python. KServe pins packages that conflict with the project's environment
# (python-dateutil<3, protobuf<7), so it gets an environment of its own that layers over
# the project's: a .pth file adds .venv's site-packages (and runs .venv's own .pth files,
# such as the editable install's) after its own, so torch, transformers and
# lepton_trainer come from .venv, and only what KServe needs in other versions is
# installed here, ahead of them. Idempotent: a second run only checks.
#
#   KSERVE_VENV     where (default .venv/kserve, beside checkov's, git-ignored and
#                   removed together with the project's venv it depends on)
#   KSERVE_VERSION  the kserve release (default below)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
project_venv=$root/.venv
venv=${KSERVE_VENV:-$project_venv/kserve}
version=${KSERVE_VERSION:-0.21.0}
log() { echo "[kserve-venv] $*" >&2; }

if [ ! -x "$project_venv/bin/python" ]; then
  log "no $project_venv: run 'make python' (hack/setup-python.sh) first"
  exit 1
fi
base=$("$project_venv/bin/python" -c 'import sys; print(sys._base_executable)')
project_site=$("$project_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp=$venv/.kserve-installed
want="$version $project_site"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
   && "$venv/bin/python" -c 'import kserve, transformers, lepton_trainer' 2>/dev/null; then
  log "$venv is up to date (kserve $version)"
  echo "$venv/bin/python"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$base" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# zz_: processed after every other .pth, so the project's packages come last on sys.path;
# addsitedir (not a bare path) so that .venv's own .pth files run too
echo "import site; site.addsitedir('$project_site')" > "$site/zz_project.pth"
log "installing kserve $version into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off "kserve==$version" >&2
"$venv/bin/python" -c 'import kserve, transformers, lepton_trainer' >&2
echo "$want" > "$stamp"
log "done"
echo "$venv/bin/python"
