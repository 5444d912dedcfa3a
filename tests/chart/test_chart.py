"""The Helm chart: lint, CRD copies, rendering, values schema, security context."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lepton-operator"
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

pytestmark = pytest.mark.unit
KUBE_VERSION = localcluster.versions()["K8S_VERSION"].lstrip("v")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    helm_bin = localcluster.tool_path("helm")
    if not helm_bin.exists():
        pytest.fail(f"helm is not built: run hack/build-tools.sh ({helm_bin} missing)", pytrace=False)
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, check=check)


def render(*sets: str) -> list[dict]:
    args = ["template", "lepton", str(CHART), "-n", "lepton-system", "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_crds_are_exact_copies_of_crds_dir():
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert source, "crds/ is empty"
    assert copies.keys() == source.keys(), "charts/lepton-operator/crds must hold exactly the files of crds/"
    stale = [name for name in source if source[name] != copies[name]]
    assert not stale, f"chart CRDs differ from crds/: {stale}; copy crds/*.yaml into the chart"


def test_helm_lint_strict():
    result = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_pod_is_locked_down():
    dep = by_kind(render(), "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["memory"]


def test_every_empty_dir_of_the_chart_is_bounded():
    """An emptyDir without sizeLimit can fill its node's disk."""
    docs = render("replicas=2", "leaderElection.enabled=true")
    pods = [d["spec"]["template"]["spec"] for d in by_kind(docs, "Deployment")] + \
           [d["spec"] for d in by_kind(docs, "Pod")]
    dirs = [v for pod in pods for v in pod.get("volumes", []) if "emptyDir" in v]
    assert dirs and all(v["emptyDir"].get("sizeLimit") for v in dirs), dirs


FULLNAME = "lepton-lepton-operator"          # release "lepton" of chart "lepton-operator"
LEASE_ROLE = f"{FULLNAME}-leader-election"


def watch_roles(docs: list[dict]) -> list[dict]:
    """The Roles of watched namespaces (not the leader-election Role)."""
    return [r for r in by_kind(docs, "Role") if r["metadata"]["name"] != LEASE_ROLE]


def test_all_namespaces_mode_uses_one_cluster_role():
    docs = render()
    assert not watch_roles(docs)
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    groups = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("lepton.ai", "leptonjobs") in groups and ("", "pods") in groups


def test_watch_namespaces_mode_uses_roles_per_namespace():
    docs = render("watchNamespaces={team-a,team-b}")
    roles = watch_roles(docs)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    cluster_rules = by_kind(docs, "ClusterRole")[0]["rules"]
    cluster_resources = {r for rule in cluster_rules for r in rule["resources"]}
    assert "nodes" in cluster_resources, "capacity needs nodes cluster-wide"
    # Pods are read cluster-wide (read-only) only when asked for: clusterGpuUsage=true
    assert "pods" not in cluster_resources
    wide = by_kind(render("watchNamespaces={team-a,team-b}", "clusterGpuUsage=true"), "ClusterRole")[0]["rules"]
    assert [sorted(r["verbs"]) for r in wide if "pods" in r["resources"]] == [["list", "watch"]]
    env = {e["name"]: e.get("value") for e in
           by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LEPTON_CLUSTER_GPU_USAGE"] == "false"
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--namespace=team-a", "--namespace=team-b"]


def test_no_rule_grants_wildcards_and_secrets_are_only_created_and_read_by_name():
    """The operator creates each job's rendezvous token and reads it back by name: it may
    never list or watch Secrets (that reads every Secret of a namespace)."""
    for docs, granted in ((render(), {("ClusterRole", None)}), (render("watchNamespaces={x}"), {("Role", "x")})):
        secret_rules = set()
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
                if "secrets" in rule["resources"]:
                    assert rule["resources"] == ["secrets"] and sorted(rule["verbs"]) == ["create", "get"], rule
                    secret_rules.add((role["kind"], role["metadata"].get("namespace")))
        assert secret_rules == granted


@pytest.mark.parametrize("setting, message", [
    ("metrics.port=http", "got string, want integer"),
    ("logLevel=verbose", "logLevel"),
    ("prometheus.url=prometheus:9090", "prometheus/url"),
    ("watchNamespaces={Bad_NS}", "watchNamespaces/0"),
    ("unknownKey=1", "unknownKey"),
    ("replicas=0", "replicas"),
    ("replicas=1.5", "replicas"),
    ("leaderElection.enabled=maybe", "leaderElection/enabled"),
    ("image.digest=sha256:abc", "image/digest"),
    ("image.digest=0123", "image/digest"),
])
def test_values_schema_rejects_bad_values(setting, message):
    result = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def container(docs: list[dict]) -> dict:
    return by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]


def test_helm_template_needs_no_flags():
    """Offline rendering works against helm's default Kubernetes version; the version and
    namespace checks need a cluster and run at install (test_chart_install)."""
    out = helm("template", str(CHART))
    assert "kind: Deployment" in out.stdout


@pytest.mark.parametrize("namespaced", [False, True])
def test_every_chart_value_reaches_the_operators_own_config_parser(namespaced, monkeypatch):
    from lepton_operator import config
    from lepton_operator.__main__ import parse_args
    sets = ["trainerImage=reg.example/trainer:9", "trainerImagePullPolicy=Always",
            "prometheus.url=http://prom.monitoring.svc:9090", "prometheus.timeoutSeconds=0.5",
            "resyncSeconds=17", "metrics.port=9102", "health.port=9103", "logLevel=debug", "replicas=2"]
    if namespaced:
        sets += ["watchNamespaces={team-a,team-b}", "clusterGpuUsage=true"]
    c = container(render(*sets))
    # What the kubelet puts into the downward-API variables of a pod of this release.
    downward = {"metadata.name": f"{FULLNAME}-5d8c7b9f4-x2x7q", "metadata.namespace": "lepton-system"}
    env = {e["name"]: e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in c["env"]}
    declared = {name for st in config.SETTINGS for name in (st.env, *st.aliases)}
    for name in list(os.environ):
        if name in declared:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args, s = parse_args(c["args"])
    assert s == config.Settings(
        namespaces=("team-a", "team-b") if namespaced else (), trainer_image="reg.example/trainer:9",
        image_pull_policy="Always", prometheus_url="http://prom.monitoring.svc:9090", prometheus_timeout=0.5,
        metrics_port=9102, health_port=9103, resync_seconds=17.0,
        cluster_gpu_usage=namespaced, operator_namespace="lepton-system",    # the stores' report port opens to it
        operator_pod_labels=(("app.kubernetes.io/name", "lepton-operator"), ("app.kubernetes.io/instance", "lepton")),
        leader_election=True, leader_election_name=FULLNAME, leader_election_namespace="lepton-system",
        leader_election_identity=f"{FULLNAME}-5d8c7b9f4-x2x7q")
    assert args.verbose and s.all_namespaces is not namespaced
    assert set(env) <= declared, f"the chart sets variables the operator does not read: {set(env) - declared}"


def test_the_chart_readme_table_is_the_operators_settings():
    from lepton_operator import config
    assert config.table() in (CHART / "README.md").read_text(), \
        "charts/lepton-operator/README.md: paste the output of python -m lepton_operator.config"


@pytest.mark.parametrize("typo, where", [
    ("resources.limit.cpu=1", "/resources"), ("podSecurityContext.runAsNonroot=true", "/podSecurityContext"),
    ("securityContext.readOnlyRootFileSystem=true", "/securityContext"), ("tolerations[0].keyy=a", "/tolerations/0"),
    ("affinity.nodeAffinty.x=1", "/affinity"), ("podSecurityContext.runAsUser=abc", "/podSecurityContext/runAsUser"),
])
def test_typos_inside_kubernetes_objects_are_rejected(typo, where):
    out = helm("template", "lepton", str(CHART), "--set", typo, check=False)
    assert out.returncode != 0 and f"at '{where}'" in out.stderr, out.stderr


@pytest.mark.parametrize("sets", [["podSecurityContext=null", "securityContext=null"],
                                  ["podSecurityContext.runAsUser=70000"]])
def test_values_cannot_silently_remove_the_hardening(sets):
    c = render(*sets)
    pod = by_kind(c, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    if "podSecurityContext.runAsUser=70000" in sets:
        assert pod["securityContext"]["runAsUser"] == 70000          # a field overrides, the rest stays
    off = by_kind(render("hardening.enabled=false", "securityContext=null"), "Deployment")[0]
    assert off["spec"]["template"]["spec"]["containers"][0]["securityContext"] == {}   # only by name


def test_metrics_port_zero_turns_metrics_off():
    c = container(render("metrics.port=0"))
    assert {e["name"]: e.get("value") for e in c["env"]}["LEPTON_METRICS_PORT"] == "0"
    assert "metrics" not in [p["name"] for p in c["ports"]]


def test_replicas_wait_as_standbys_behind_a_lease_with_least_privilege():
    from lepton_operator.core import leader
    docs = render("replicas=3")
    dep = by_kind(docs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["LEPTON_LEADER_ELECTION"]["value"] == "true"
    assert env["LEPTON_LEADER_ELECTION_NAME"]["value"] == FULLNAME
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == LEASE_ROLE]
    assert role["metadata"]["namespace"] == "lepton-system"
    assert all(r["apiGroups"] == ["coordination.k8s.io"] and r["resources"] == ["leases"] for r in role["rules"])
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert verbs == set(leader.LEASE_VERBS), "the Role grants exactly the verbs the elector uses"
    named = [r for r in role["rules"] if set(r["verbs"]) & {"get", "update"}]
    assert all(r.get("resourceNames") == [FULLNAME] for r in named), "get and update only the one Lease"
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == LEASE_ROLE]
    assert binding["roleRef"]["name"] == LEASE_ROLE
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": "lepton-system"}]
    cluster_verbs = {(r, v) for cr in by_kind(docs, "ClusterRole") for rule in cr["rules"]
                     for r in rule["resources"] for v in rule["verbs"]}
    assert not {r for r, _ in cluster_verbs} & {"leases"}, "no lease rights cluster-wide"


def test_without_leader_election_one_replica_is_replaced_only_after_the_old_one_is_gone():
    docs = render("leaderElection.enabled=false")
    dep = by_kind(docs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["LEPTON_LEADER_ELECTION"] == "false" and "POD_NAME" not in env
    # The operator's identity in its jobs' NetworkPolicies does not depend on leader election.
    assert "POD_NAMESPACE" in env and env["LEPTON_OPERATOR_POD_LABELS"] == \
        "app.kubernetes.io/name=lepton-operator,app.kubernetes.io/instance=lepton"
    assert not [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == LEASE_ROLE]
    out = helm("template", "lepton", str(CHART), "--set", "replicas=2", "--set", "leaderElection.enabled=false",
               check=False)
    assert out.returncode != 0 and "replicas: 2 needs leaderElection.enabled=true" in out.stderr, out.stderr


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_an_image_digest_wins_over_the_tag():
    tagged = render("image.tag=1.2.3")
    assert container(tagged)["image"] == "ghcr.io/lepton-operator/lepton-operator:1.2.3"
    pinned = render("image.tag=1.2.3", f"image.digest={DIGEST}")
    test_pod = next(p for p in by_kind(pinned, "Pod") if p["metadata"]["name"].endswith("-test-metrics"))
    for c in (container(pinned), test_pod["spec"]["containers"][0]):
        assert c["image"] == f"ghcr.io/lepton-operator/lepton-operator@{DIGEST}"
    trainer = f"reg.example/lepton-trainer@{DIGEST}"
    env = {e["name"]: e.get("value") for e in container(render(f"trainerImage={trainer}"))["env"]}
    assert env["LEPTON_TRAINER_IMAGE"] == trainer


def test_network_policy_rights_are_exactly_what_the_operator_uses():
    from lepton_operator.core.objects import NETWORK_POLICY_VERBS
    for docs, kind in ((render(), "ClusterRole"), (render("watchNamespaces={team-a}"), "Role")):
        rules = [r for role in by_kind(docs, kind) for r in role["rules"] if "networkpolicies" in r["resources"]]
        assert [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in rules] == \
            [(["networking.k8s.io"], ["networkpolicies"], sorted(NETWORK_POLICY_VERBS))], kind


def test_pod_logs_are_only_read_and_only_where_the_operator_works():
    """The tail of a compression pod's log (its progress): ``get`` of ``pods/log``, nothing else,
    in the ClusterRole watching all namespaces, in each watched namespace's Role otherwise."""
    for docs, kind in ((render(), "ClusterRole"), (render("watchNamespaces={team-a}"), "Role")):
        rules = [r for role in by_kind(docs, kind) for r in role["rules"] if "pods/log" in r["resources"]]
        assert [(r["apiGroups"], r["resources"], r["verbs"]) for r in rules] == [([""], ["pods/log"], ["get"])], kind
    cluster = by_kind(render("watchNamespaces={team-a}", "clusterGpuUsage=true"), "ClusterRole")
    assert not [r for role in cluster for r in role["rules"] if "pods/log" in r["resources"]]


def test_capacity_request_rights_are_exactly_what_the_operator_uses():
    from lepton_operator.job.objects import CAPACITY_REQUEST_VERBS
    for docs, kind in ((render(), "ClusterRole"), (render("watchNamespaces={team-a}"), "Role")):
        rules = {r["resources"][0]: sorted(r["verbs"]) for role in by_kind(docs, kind) for r in role["rules"]
                 if set(r["resources"]) & set(CAPACITY_REQUEST_VERBS)}
        assert rules == {k: sorted(v) for k, v in CAPACITY_REQUEST_VERBS.items()}, kind


def test_the_operator_has_readiness_and_a_cpu_limit():
    c = container(render())
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    assert "readinessProbe" not in container(render("health.port=0"))


def test_a_disruption_budget_keeps_a_standby_through_drains():
    """With replicas > 1 a PodDisruptionBudget keeps minAvailable operator pods through a
    drain; with 1 replica none is rendered, since it would block every drain of its node."""
    assert by_kind(render(), "PodDisruptionBudget") == []
    docs = render("replicas=2")
    pdb, = by_kind(docs, "PodDisruptionBudget")
    deployment, = by_kind(docs, "Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert by_kind(render("replicas=2", "podDisruptionBudget.enabled=false"), "PodDisruptionBudget") == []


def test_the_operator_takes_a_priority_class_so_its_replacement_is_not_left_pending():
    def pod_spec(*sets: str) -> dict:
        return by_kind(render(*sets), "Deployment")[0]["spec"]["template"]["spec"]
    assert "priorityClassName" not in pod_spec()
    assert pod_spec("priorityClassName=system-cluster-critical")["priorityClassName"] == "system-cluster-critical"
