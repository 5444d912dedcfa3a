"""The LeptonJob CRD: every field documented, examples valid against schema and parser."""
import pathlib

import pytest
import yaml

from lepton_operator.job.spec import parse_job

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "leptonjob.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(schema, path=""):
    for key, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{key}", sub
        yield from walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_every_field_has_a_description():
    missing = [p for p, sub in walk(SCHEMA) if p != ".metadata" and not sub.get("description")]
    assert missing == []


def test_crd_names_subresources_and_columns():
    names = CRD["spec"]["names"]
    assert names["shortNames"] == ["lj"] and names["categories"] == ["lepton"]
    version = CRD["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.workers.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(cols) == ["Phase", "Ready", "Restarts", "Failures", "Age"]
    # RESTARTS are restarts that happened; failures counted against backoffLimit are their own column.
    assert cols["Restarts"] == ".status.restartCount" and cols["Failures"] == ".status.restarts.counted"


def unknown_fields(obj, schema, path="spec"):
    """Fields of ``obj`` the schema does not declare (the API server would prune them silently)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(obj, (dict, list)):
        return []
    if isinstance(obj, list):
        return [u for i, item in enumerate(obj) for u in unknown_fields(item, schema.get("items", {}), f"{path}[{i}]")]
    props = schema.get("properties")
    if props is None:
        return []
    out = [f"{path}.{k}" for k in obj if k not in props]
    return out + [u for k, v in obj.items() if k in props for u in unknown_fields(v, props[k], f"{path}.{k}")]


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*leptonjob*.yaml")), ids=lambda p: p.name)
def test_examples_match_the_schema_and_parse(example):
    jobs = [d for d in yaml.safe_load_all(example.read_text()) if d and d["kind"] == "LeptonJob"]
    assert jobs
    for job in jobs:
        assert unknown_fields(job["spec"], SCHEMA["properties"]["spec"]) == []
        parse_job(job["metadata"]["name"], job["spec"], "img")
