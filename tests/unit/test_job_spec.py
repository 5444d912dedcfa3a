"""LeptonJob spec parsing: defaults and every semantic rule, table-driven."""
import pytest

from lepton_operator.job.spec import DEFAULT_MODULE, InvalidSpec, parse_job

pytestmark = pytest.mark.unit
IMG = "trainer:1"


def test_defaults():
    job = parse_job("train", {}, IMG)
    assert job.image == IMG and job.module == DEFAULT_MODULE and job.command == ()
    assert (job.workers.min, job.workers.max, job.workers.replicas, job.workers.nproc_per_node) == (1, 1, 1, 1)
    assert job.backoff_limit == 3 and job.elastic.max_restarts == 3
    assert job.elastic.last_call_timeout == 2 and job.checkpoint is None and not job.suspend


def test_gpus_set_nproc_default_and_output_defaults_to_checkpoint_claim():
    job = parse_job("train", {"resources": {"gpus": 4}, "workers": {"min": 2, "max": 4},
                              "checkpoint": {"claimName": "ckpt", "subPath": "run1"}}, IMG)
    assert job.workers.nproc_per_node == 4 and job.workers.replicas == 2
    assert job.output.claim_name == "ckpt" and job.output.path == "/output"
    assert job.claim_names == ("ckpt",)
    assert job.checkpoint.uri == "pvc://ckpt/run1" and job.output.uri == "pvc://ckpt/run1/output"


def test_command_replaces_default_module():
    job = parse_job("train", {"command": ["/app/train.py"], "args": ["--epochs", "2"]}, IMG)
    assert job.module is None and job.command == ("/app/train.py",) and job.args == ("--epochs", "2")


@pytest.mark.parametrize("name, spec, message", [
    ("a.b", {}, "must not contain dots"),
    ("x" * 53, {}, "at most 52 characters"),
    ("9lives", {}, "must start with a letter"),
    ("j", {"workers": {"min": 3, "max": 2}}, "workers.max (2) must be >= workers.min (3)"),
    ("j", {"workers": {"min": 1, "max": 2, "replicas": 5}}, "workers.replicas (5) must be between"),
    ("j", {"workers": {"min": 0}}, "workers.min must be between 1 and 999"),
    ("j", {"workers": {"max": "two"}}, "workers.max must be an integer"),
    ("j", {"command": ["a.py"], "module": "m"}, "either command or module"),
    ("j", {"resources": {"gpus": -1}}, "resources.gpus must be between 0 and 64"),
    ("j", {"env": [{"name": "LEPTON_JOB_UID", "value": "x"}]}, "set by the operator"),
    ("j", {"checkpoint": {"path": "/c"}}, "checkpoint.claimName is required"),
    ("j", {"checkpoint": {"claimName": "Bad_Name"}}, "not a valid PVC name"),
    ("j", {"checkpoint": {"claimName": "c", "path": "rel"}}, "must be an absolute path"),
    ("j", {"checkpoint": {"claimName": "c", "subPath": "../x"}}, "must not contain '..'"),
    ("j", {"elastic": {"joinTimeoutSeconds": 0}}, "elastic.joinTimeoutSeconds must be between 1"),
    ("j", {"activeDeadlineSeconds": 0}, "activeDeadlineSeconds must be >= 1"),
    ("j", {"backoffLimit": True}, "backoffLimit must be an integer"),
    # what the Pod and NetworkPolicy APIs would refuse on the worker pod: found by
    # tests/integration/test_spec_properties.py, refused by the CRD too
    ("j", {"nodeSelector": {"bad key!": "v"}}, "nodeSelector key 'bad key!' must be at most 63"),
    ("j", {"nodeSelector": {"-x.io/gpu": "a"}}, "has a prefix that is no DNS subdomain"),
    ("j", {"nodeSelector": {"gpu": "a b"}}, "nodeSelector['gpu'] must be empty or at most 63"),
    ("j", {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
     "tolerations[0].value must be empty when operator is Exists"),
    ("j", {"tolerations": [{"value": "v"}]}, "tolerations[0].operator must be Exists when key is empty"),
    ("j", {"tolerations": [{"key": "k", "tolerationSeconds": 5}]}, "tolerationSeconds needs effect NoExecute"),
    ("j", {"securityContext": {"privileged": True, "allowPrivilegeEscalation": False}},
     "allowPrivilegeEscalation false cannot go with privileged true"),
    ("j", {"securityContext": {"capabilities": {"add": ["CAP_SYS_ADMIN"]}, "allowPrivilegeEscalation": False}},
     "allowPrivilegeEscalation false cannot go with"),
    ("j", {"podSecurityContext": {"seccompProfile": {"type": "Localhost"}}},
     "podSecurityContext.seccompProfile.localhostProfile is required when type is Localhost"),
    ("j", {"networkPolicy": {"ingressFrom": [{"ipBlock": {"cidr": "bad"}}]}}, "ipBlock.cidr must be a CIDR"),
    ("j", {"networkPolicy": {"ingressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}},
     "must be a strict subset of cidr"),
    ("j", {"env": [{"value": "x"}]}, "env[0].name is required"),
])
def test_invalid_specs_are_explained(name, spec, message):
    with pytest.raises(InvalidSpec) as err:
        parse_job(name, spec, IMG)
    assert message in str(err.value)


def test_all_problems_reported_together():
    with pytest.raises(InvalidSpec) as err:
        parse_job("a.b", {"workers": {"min": 3, "max": 2}, "command": ["x"], "module": "m"}, IMG)
    assert len(err.value.problems) == 3


def test_pod_fields_the_api_server_accepts_parse():
    job = parse_job("j", {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "pool": ""},
                          "tolerations": [{"operator": "Exists"},
                                          {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                          {"key": "spot", "value": "true", "effect": "NoExecute",
                                           "tolerationSeconds": 30}],
                          "networkPolicy": {"ingressFrom": [{"ipBlock": {"cidr": "10.0.0.1/8",
                                                                          "except": ["10.1.0.0/16"]}},
                                                            {"ipBlock": {"cidr": "2001:db8::/32"}}]}}, IMG)
    assert job.node_selector["pool"] == "" and len(job.tolerations) == 3


def test_privileged_drops_the_escalation_default_and_an_explicit_choice_stays():
    from lepton_operator.core.objects import container_security
    assert "allowPrivilegeEscalation" not in container_security({"privileged": True})
    assert "allowPrivilegeEscalation" not in container_security({"capabilities": {"add": ["CAP_SYS_ADMIN"]}})
    assert container_security({})["allowPrivilegeEscalation"] is False
    assert container_security({"privileged": True, "allowPrivilegeEscalation": True})["allowPrivilegeEscalation"]
