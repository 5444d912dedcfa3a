#!/usr/bin/env bash
# Creates the virtualenv that bench/llm.py runs llama.cpp's OpenAI server from
# (llama-cpp-python with its "server" extras), and prints its python. It is a venv of its
# own (its server pins FastAPI, uvicorn and pydantic-settings apart from the project's).
# llama-cpp-python ships no binary wheel on PyPI: it is built once from source (about 25
# minutes on 2 cores, CPU-only, the native build of ggml) into a wheel cache, and every
# later run installs that wheel. Idempotent: a second run only checks.
#
#   LLAMA_CPP_VENV     where (default .venv/llama-cpp, beside kserve's, git-ignored)
#   LLAMA_CPP_VERSION  the llama-cpp-python release (default below)
#   LLAMA_CPP_WHEELS   the wheel cache (default ~/.cache/lepton-operator/wheels)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
project_venv=$root/.venv
venv=${LLAMA_CPP_VENV:-$project_venv/llama-cpp}
version=${LLAMA_CPP_VERSION:-0.3.36}
wheels=${LLAMA_CPP_WHEELS:-$HOME/.cache/lepton-operator/wheels}
log() { echo "[llama-cpp-venv] $*" >&2; }

if [ ! -x "$project_venv/bin/python" ]; then
  log "no $project_venv: run 'make python' (hack/setup-python.sh) first"
  exit 1
fi
stamp=$venv/.llama-cpp-installed
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ] \
   && "$venv/bin/python" -c 'import llama_cpp.server.app' 2>/dev/null; then
  log "$venv is up to date (llama-cpp-python $version)"
  echo "$venv/bin/python"
  exit 0
fi
base=$("$project_venv/bin/python" -c 'import sys; print(sys._base_executable)')
wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  log "no wheel of llama-cpp-python $version in $wheels: building it from source (minutes)"
  mkdir -p "$wheels"
  CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF} "$project_venv/bin/python" -m pip wheel --no-deps \
    --disable-pip-version-check -q -w "$wheels" "llama-cpp-python==$version" >&2
  wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -1)
fi
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$base" -m venv "$venv"
fi
log "installing $wheel with its server extras into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off "$wheel[server]" >&2
"$venv/bin/python" -c 'import llama_cpp.server.app' >&2
echo "$version" > "$stamp"
log "done"
echo "$venv/bin/python"
