#!/usr/bin/env python3
"""Builds the operator and trainer images from the repository's Dockerfiles with buildah,
without Docker and without any registry image.

* **Base.** ``python:*-slim`` and ``pytorch/pytorch`` come from registries this machine
  cannot reach, so the base is made here: Debian's ``minbase`` (debootstrap) plus Debian's
  python3 and pip, committed as ``localhost/lepton-python:<suite>-<recipe hash>`` and passed
  to both Dockerfiles as ``PYTHON_BASE``. The trainer image is the ``pypi`` variant: torch
  from PyPI (the CUDA build, which runs on CPU with gloo).
* **Cache.** Each image is tagged with the hash of everything that goes into it (its
  Dockerfile, the build context's files, the base and the build arguments); an image
  whose tag exists is not built again, and ``buildah bud --layers`` reuses unchanged
  layers (torch) when only the code changed.
* **Pause.** The real node's sandbox image: the ``pause`` binary from hack/pause.

Command line::

    python3 hack/images.py build                 # base, pause, operator, trainer (cached)
    python3 hack/images.py refs                  # the image references, as JSON
    python3 hack/images.py push --registry R     # R/lepton-operator:<v>, R/lepton-trainer:<v>
    python3 hack/images.py import --address SOCK # into a containerd (the real node's)
    python3 hack/images.py preload               # into the real node's image store, ahead of time

Builds on ``hack/common.py``; only the Python standard library is used.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, HACK, ROOT, containerd_address, node_containerds, versions, write_containerd_config

REPO = "localhost"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")

# What each image is built from: its Dockerfile, the context paths it copies, build args.
IMAGES = {
    "operator": {"dockerfile": "Dockerfile",
                 "context": ["pyproject.toml", "README.md", "operator", "trainer_image/lepton_trainer"],
                 "args": {}},
    "trainer": {"dockerfile": "trainer_image/Dockerfile",
                "context": ["trainer_image/lepton_trainer"],
                "args": {"VARIANT": "pypi"}},
}


def log(msg: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    """What this machine lacks to build images (empty: it can)."""
    need = [t for t in ("buildah", "debootstrap", "go") if not shutil.which(t)]
    if os.geteuid() != 0:
        need.append("root (buildah's overlay storage and debootstrap)")
    return need


def _files(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = ROOT / p
        if path.is_file():
            out.append(path)
            continue
        for f in sorted(path.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc" \
                    and not any(part.endswith(".egg-info") for part in f.parts):
                out.append(f)
    return out


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def base_ref() -> str:
    suite = versions()["DEBIAN_SUITE"]
    recipe = json.dumps({"suite": suite, "packages": BASE_PACKAGES, "v": 1}).encode()
    return f"{REPO}/lepton-python:{suite}-{_digest(recipe)}"


def pause_binary() -> Path:
    v = hashlib.sha256((HACK / "pause" / "main.go").read_bytes()).hexdigest()[:12]
    return CACHE / "bin" / f"pause-{v}"


def pause_ref() -> str:
    return f"{REPO}/lepton-pause:{_digest(pause_binary().name.encode())}"


def build_args(name: str) -> dict[str, str]:
    args = {"PYTHON_BASE": base_ref(), **IMAGES[name]["args"]}
    if name == "trainer":
        args["TORCH_VERSION"] = versions()["TORCH_VERSION"]
    return args


def ref(name: str) -> str:
    spec = IMAGES[name]
    files = _files([spec["dockerfile"], ".dockerignore", *spec["context"]])
    parts = [json.dumps(build_args(name), sort_keys=True).encode()]
    for f in files:
        parts += [str(f.relative_to(ROOT)).encode(), f.read_bytes()]
    return f"{REPO}/lepton-{name}:{_digest(*parts)}"


def refs() -> dict[str, str]:
    return {"base": base_ref(), "pause": pause_ref(), **{n: ref(n) for n in IMAGES}}


def _run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, **kw)


def exists(image: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", image],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def build_base() -> str:
    image = base_ref()
    if exists(image):
        return image
    suite = versions()["DEBIAN_SUITE"]
    log(f"debootstrap {suite} (minbase + {' '.join(BASE_PACKAGES)}) -> {image}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs),
             DEBIAN_MIRROR, stdout=subprocess.DEVNULL)
        # pip installs into the image's own python: the image is the environment.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "var/cache/debconf"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        ctr = subprocess.run(["buildah", "from", "scratch"], check=True, capture_output=True,
                             text=True).stdout.strip()
        try:
            mnt = subprocess.run(["buildah", "mount", ctr], check=True, capture_output=True,
                                 text=True).stdout.strip()
            _run("cp", "-a", f"{rootfs}/.", mnt)
            _run("buildah", "umount", ctr)
            _run("buildah", "config", "--env", "LANG=C.UTF-8",
                 "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--cmd", "python3", ctr)
            _run("buildah", "commit", "--quiet", ctr, image, stdout=subprocess.DEVNULL)
        finally:
            subprocess.run(["buildah", "rm", ctr], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _record_build("base", image, time.monotonic() - t0)
    return image


def build_pause() -> str:
    image = pause_ref()
    if exists(image):
        return image
    if not pause_binary().exists():
        _run("bash", str(HACK / "build-tools.sh"), "pause")
    log(f"pause -> {image}")
    ctr = subprocess.run(["buildah", "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        _run("buildah", "copy", "--quiet", "--chmod", "0755", ctr, str(pause_binary()), "/pause",
             stdout=subprocess.DEVNULL)
        _run("buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr)
        _run("buildah", "commit", "--quiet", ctr, image, stdout=subprocess.DEVNULL)
    finally:
        subprocess.run(["buildah", "rm", ctr], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return image


def build(name: str) -> str:
    image = ref(name)
    if exists(image):
        log(f"{name}: {image} (cached)")
        return image
    build_base()
    argv = ["buildah", "bud", "--layers", "--quiet", "--network", "host",
            "-f", str(ROOT / IMAGES[name]["dockerfile"]), "-t", image]
    if Path(CA_BUNDLE).exists():
        # pip in the build reaches PyPI through whatever TLS proxy this machine trusts;
        # the bundle is mounted for the build's RUN steps only, never stored in a layer.
        argv += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    for key, value in build_args(name).items():
        argv += ["--build-arg", f"{key}={value}"]
    log(f"{name}: building {image}")
    t0 = time.monotonic()
    _run(*argv, str(ROOT), stdout=subprocess.DEVNULL)
    _record_build(name, image, time.monotonic() - t0)
    return image


BUILDS = CACHE / "image-builds.json"


def _record_build(name: str, image: str, seconds: float) -> None:
    """Keep how long each build took (bench/realnode.py reports them)."""
    log(f"{name}: built in {seconds:.0f}s")
    builds = json.loads(BUILDS.read_text()) if BUILDS.exists() else {}
    builds.setdefault(name, []).append({"image": image, "seconds": round(seconds, 1),
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    BUILDS.write_text(json.dumps(builds, indent=2))


def build_all() -> dict[str, str]:
    """Build what is missing; the references of the images built (named by the sources
    at the start of each build, so that a file edited meanwhile does not rename them)."""
    return {"base": build_base(), "pause": build_pause(), **{name: build(name) for name in IMAGES}}


def size_bytes(image: str) -> int:
    """The image's size as buildah reports it (its unpacked layers)."""
    info = json.loads(subprocess.run(["buildah", "images", "--json", image], capture_output=True,
                                     text=True, check=True).stdout)
    size = str(info[0].get("size", "0")) if info else "0"
    number, _, unit = size.partition(" ")   # "197 MB", "6.43 GB" (decimal units)
    return int(float(number) * {"": 1, "B": 1, "KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def containerd_images(address: str) -> set[str]:
    out = subprocess.run(["ctr", "--address", address, "-n", "k8s.io", "images", "ls", "-q"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def import_into(address: str, images: list[str] | None = None) -> None:
    """Copy images from buildah's storage into a containerd's k8s.io namespace (the one
    the CRI uses); images it already has are skipped. The archive streams from
    ``buildah push`` into ``ctr images import`` through a pipe, never touching the disk."""
    wanted = images or [pause_ref(), *(ref(n) for n in IMAGES)]
    have = containerd_images(address)
    for image in wanted:
        if image in have:
            continue
        log(f"import {image} into containerd")
        t0 = time.monotonic()
        push = subprocess.Popen(["buildah", "push", "--quiet", image, f"docker-archive:/dev/stdout:{image}"],
                                stdout=subprocess.PIPE)
        imported = subprocess.run(["ctr", "--address", address, "-n", "k8s.io", "images", "import", "-"],
                                  stdin=push.stdout, stdout=subprocess.DEVNULL)
        push.stdout.close()
        if push.wait() != 0 or imported.returncode != 0:
            raise RuntimeError(f"importing {image} into containerd failed (buildah push exit {push.returncode}, "
                               f"ctr import exit {imported.returncode})")
        log(f"imported {image} in {time.monotonic() - t0:.0f}s")


def preload() -> None:
    """Import the images into the real node's image store (its containerd root, which
    outlives clusters) with a containerd of its own, so that the first cluster starts
    without the import: ``make setup`` runs this beside the Go builds. Skipped when a
    node's containerd holds the store (it imports at start instead)."""
    if node_containerds():
        log("preload skipped: a real node's containerd is running (it imports what it lacks at start)")
        return
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        state = Path("/run") / f"lepton-containerd-preload-{os.getpid()}"
        config = write_containerd_config(Path(tmp), CACHE, pause_ref(), state)
        address = containerd_address(Path(tmp))
        proc = subprocess.Popen(["containerd", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run(["ctr", "--address", address, "version"],
                                 capture_output=True).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log("preload skipped: containerd did not start")
                    return
                time.sleep(0.2)
            import_into(address)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            shutil.rmtree(state, ignore_errors=True)


def push(registry: str, tag: str) -> dict[str, str]:
    out = {}
    for name in IMAGES:
        dest = f"{registry.rstrip('/')}/lepton-{name}:{tag}"
        log(f"push {ref(name)} -> {dest}")
        _run("buildah", "push", ref(name), f"docker://{dest}")
        out[name] = dest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "refs", "push", "import", "preload"])
    parser.add_argument("--registry", default=os.environ.get("REGISTRY", ""))
    parser.add_argument("--tag", default="", help="tag to push (default: the chart's appVersion)")
    parser.add_argument("--address", help="containerd socket for import")
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.command == "refs":
        print(json.dumps(refs(), indent=2))
        return 0
    missing = missing_tools()
    if missing:
        log(f"cannot build images here: missing {', '.join(missing)} (hack/install-system-deps.sh "
            "installs buildah and debootstrap)")
        return 1
    if args.command == "build":
        print(json.dumps(build_all(), indent=2))
    elif args.command == "push":
        if not args.registry:
            parser.error("push needs --registry (or REGISTRY=...)")
        build_all()
        tag = args.tag or next(line.split(":", 1)[1].strip().strip('"') for line in
                               (ROOT / "charts" / "lepton-operator" / "Chart.yaml").read_text().splitlines()
                               if line.startswith("appVersion:"))
        dest = push(args.registry, tag)
        print(f"helm install lepton charts/lepton-operator --set image.repository={dest['operator'].rsplit(':', 1)[0]} "
              f"--set image.tag={tag} --set trainerImage={dest['trainer']}")
    elif args.command == "preload":
        build_all()
        preload()
    elif args.command == "import":
        if not args.address:
            parser.error("import needs --address")
        import_into(args.address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
