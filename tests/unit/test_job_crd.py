"""The LeptonJob CRD: every field documented, examples valid against schema and parser."""
import pathlib
import re

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
    assert list(cols) == ["Phase", "Ready", "Restarts", "Failures", "Reconciled", "Age"]
    # RECONCILED: the age of the status an operator last wrote or confirmed (status.write).
    assert cols["Reconciled"] == ".status.reconciledAt"
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


# --- a small structural validator for the schema subset the CRDs use -----------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}


def schema_errors(value, schema, path="spec"):
    """What the API server's OpenAPI validation would reject in ``value`` (types, required,
    enum, pattern, lengths, bounds, maxItems, unknown fields); CEL rules are not evaluated."""
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"{path}: want {kind}, got {value!r}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: length of {value!r}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            errors.append(f"{path}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties")
        errors += [f"{path}.{k}: required" for k in schema.get("required", ()) if k not in value]
        for k, v in value.items():
            if props and k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(v, schema["additionalProperties"], f"{path}.{k}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{k}: unknown field")
    return errors


SPEC_SCHEMA = SCHEMA["properties"]["spec"]
DIGEST_IMAGE = "registry.example/ml/train@sha256:" + "ab" * 32
PEERS = [{"podSelector": {"matchLabels": {"app": "prometheus"},
                          "matchExpressions": [{"key": "tier", "operator": "In", "values": ["ops"]}]},
          "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
         {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]


def test_an_image_pinned_by_digest_passes_the_schema_and_the_parser_unchanged():
    image = SPEC_SCHEMA["properties"]["image"]
    assert "x-kubernetes-validations" not in image and "pattern" not in image
    assert schema_errors({"image": DIGEST_IMAGE}, SPEC_SCHEMA) == []
    assert parse_job("j", {"image": DIGEST_IMAGE}, "img").image == DIGEST_IMAGE


def test_network_policy_is_typed_on_by_default_and_takes_network_policy_peers():
    np = SPEC_SCHEMA["properties"]["networkPolicy"]
    assert np["properties"]["enabled"] == {"type": "boolean", "default": True,
                                           "description": np["properties"]["enabled"]["description"]}
    peer = np["properties"]["ingressFrom"]["items"]
    assert set(peer["properties"]) == {"podSelector", "namespaceSelector", "ipBlock"}
    rules = [v["rule"] for v in peer["x-kubernetes-validations"]]
    assert any("has(self.ipBlock)" in r and "||" in r for r in rules) and len(rules) == 2
    spec = {"networkPolicy": {"enabled": True, "ingressFrom": PEERS}}
    assert schema_errors(spec, SPEC_SCHEMA) == []
    assert parse_job("j", spec, "img").network_policy.ingress_from == tuple(PEERS)


@pytest.mark.parametrize("network_policy, where", [
    ({"enabled": "yes"}, "spec.networkPolicy.enabled: want boolean"),
    ({"ingressFrom": [{"podSelecter": {}}]}, "spec.networkPolicy.ingressFrom[0].podSelecter: unknown field"),
    ({"ingressFrom": [{"podSelector": {"matchLabel": {"a": "b"}}}]}, "podSelector.matchLabel: unknown field"),
    ({"ingressFrom": [{"podSelector": {"matchLabels": {"a": 1}}}]}, "matchLabels.a: want string"),
    ({"ingressFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}]}, "not in"),
    ({"ingressFrom": [{"ipBlock": {"except": []}}]}, "ipBlock.cidr: required"),
    ({"ingressFrom": [{"podSelector": {}}] * 33}, "more than 32 items"),
])
def test_the_schema_rejects_network_policy_typos_and_bad_types(network_policy, where):
    errors = schema_errors({"networkPolicy": network_policy}, SPEC_SCHEMA)
    assert any(where in e for e in errors), errors
