"""The LeptonModel CRD: spec.networkPolicy and images pinned by digest, against the
schema (the structural validator of test_job_crd) and the parser."""
import pathlib

import pytest
import yaml

from lepton_operator.model.spec import parse_model
from test_job_crd import PEERS, schema_errors, walk

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "leptonmodel.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
SOURCE = {"uri": "pvc://models/digits"}
DIGEST = "@sha256:" + "ab" * 32


def test_images_pinned_by_digest_pass_the_schema_and_the_parser_unchanged():
    serving, compression = f"reg.example/serve{DIGEST}", f"reg.example/compress{DIGEST}"
    spec = {"source": SOURCE, "serving": {"image": serving}, "compression": {"method": "int8", "image": compression}}
    assert schema_errors(spec, SPEC_SCHEMA) == []
    for where in (SPEC_SCHEMA["properties"]["serving"], SPEC_SCHEMA["properties"]["compression"]):
        assert "pattern" not in where["properties"]["image"]
        assert "x-kubernetes-validations" not in where["properties"]["image"]
    parsed = parse_model("digits", spec, "img")
    assert (parsed.serving.image, parsed.compression_image) == (serving, compression)


def test_network_policy_is_documented_typed_and_off_by_default():
    np = SPEC_SCHEMA["properties"]["networkPolicy"]
    assert [p for p, sub in walk(np) if not sub.get("description")] == []
    assert np["properties"]["enabled"]["default"] is False
    spec = {"source": SOURCE, "networkPolicy": {"enabled": True, "ingressFrom": PEERS}}
    assert schema_errors(spec, SPEC_SCHEMA) == []
    assert parse_model("digits", spec, "img").network_policy.ingress_from == tuple(PEERS)
    assert parse_model("digits", {"source": SOURCE}, "img").network_policy.enabled is False


@pytest.mark.parametrize("network_policy, where", [
    ({"enabled": 1}, "spec.networkPolicy.enabled: want boolean"),
    ({"ingressFrom": [{"namespaceSelectr": {}}]}, "ingressFrom[0].namespaceSelectr: unknown field"),
    ({"ingressFrom": [{"ipBlock": {"cidr": ""}}]}, "ipBlock.cidr: length"),
])
def test_the_schema_rejects_network_policy_typos_and_bad_types(network_policy, where):
    errors = schema_errors({"source": SOURCE, "networkPolicy": network_policy}, SPEC_SCHEMA)
    assert any(where in e for e in errors), errors
