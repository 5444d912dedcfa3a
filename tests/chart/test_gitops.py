"""examples/gitops: Argo CD Applications and Flux objects that install the chart and the
quickstart. Current API versions, paths that exist in this repository, values the chart's
schema accepts, and kustomizations that `kubectl kustomize` builds into the quickstart."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_chart import CHART, ROOT, helm

sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

pytestmark = pytest.mark.unit
GITOPS = ROOT / "examples" / "gitops"
EXAMPLES = ROOT / "examples"
QUICKSTART = ["quickstart-leptonjob.yaml", "quickstart-leptonmodel.yaml"]
CURRENT = {  # kind -> the current apiVersion (Argo CD 2.x/3.x, Flux 2.3+)
    "Application": "argoproj.io/v1alpha1",
    "GitRepository": "source.toolkit.fluxcd.io/v1",
    "HelmRelease": "helm.toolkit.fluxcd.io/v2",
}
FLUX_KUSTOMIZATION = "kustomize.toolkit.fluxcd.io/v1"
KUSTOMIZE_CONFIG = "kustomize.config.k8s.io/v1beta1"


def manifests() -> list[tuple[Path, dict]]:
    files = sorted(GITOPS.rglob("*.yaml")) + sorted(GITOPS.rglob("*.yml"))
    assert files, "examples/gitops holds no YAML"
    return [(f, d) for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def of_kind(kind: str, api_version: str | None = None) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind and (api_version is None or d["apiVersion"] == api_version)]


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = localcluster.tool_path("kubectl")
    if not exe.exists():
        pytest.fail(f"kubectl is not built: run hack/build-tools.sh ({exe} missing)", pytrace=False)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=check)


def docs_of(text: str) -> list[dict]:
    return sorted((d for d in yaml.safe_load_all(text) if d), key=lambda d: (d["kind"], d["metadata"]["name"]))


def test_every_manifest_uses_the_current_api_versions():
    seen = set()
    for path, d in manifests():
        kind, version = d["kind"], d["apiVersion"]
        if kind == "Kustomization":
            if path.name == "kustomization.yaml":
                assert version == KUSTOMIZE_CONFIG, path
            else:
                assert version == FLUX_KUSTOMIZATION, path
        else:
            assert CURRENT.get(kind) == version, f"{path.relative_to(ROOT)}: {version} {kind}"
        seen.add((version, kind))
    wanted = {(v, k) for k, v in CURRENT.items()} | {(FLUX_KUSTOMIZATION, "Kustomization")}
    assert wanted <= seen, f"missing: {wanted - seen}"


def repo_path(p: str) -> Path:
    path = (ROOT / p.removeprefix("./")).resolve()
    assert ROOT in path.parents, f"{p} leaves the repository"
    return path


def test_argocd_applications_name_paths_of_this_repository():
    apps = {a["metadata"]["name"]: a for a in of_kind("Application")}
    assert set(apps) == {"lepton-operator", "lepton-quickstart"}
    chart = apps["lepton-operator"]["spec"]["source"]
    assert repo_path(chart["path"]) == CHART and (CHART / "Chart.yaml").exists()
    quickstart = apps["lepton-quickstart"]["spec"]["source"]
    assert (repo_path(quickstart["path"]) / "kustomization.yaml").exists()
    for app in apps.values():
        src = app["spec"]["source"]
        assert app["metadata"]["namespace"] == "argocd" and src["targetRevision"]
        assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"
    assert len({a["spec"]["source"]["repoURL"] for a in apps.values()}) == 1
    assert "ServerSideApply=true" in apps["lepton-operator"]["spec"]["syncPolicy"]["syncOptions"]


def test_flux_objects_reference_each_other_and_paths_of_this_repository():
    (repo,) = of_kind("GitRepository")
    (release,) = of_kind("HelmRelease")
    kustomizations = {k["metadata"]["name"]: k for k in of_kind("Kustomization", FLUX_KUSTOMIZATION)}
    ref = {"kind": "GitRepository", "name": repo["metadata"]["name"]}
    ns = repo["metadata"]["namespace"]

    chart = release["spec"]["chart"]["spec"]
    assert repo_path(chart["chart"]) == CHART
    assert {k: chart["sourceRef"][k] for k in ref} == ref and chart["sourceRef"].get("namespace", ns) == ns
    assert release["metadata"].get("namespace") == ns
    assert release["spec"]["install"]["crds"] == "CreateReplace" and release["spec"]["test"]["enable"] is True

    ignored = repo["spec"].get("ignore", "").split()
    for k in kustomizations.values():
        assert k["spec"]["sourceRef"] == ref and k["metadata"]["namespace"] == ns
        path = repo_path(k["spec"]["path"])
        assert (path / "kustomization.yaml").exists(), path
        for dep in k["spec"].get("dependsOn", []):
            assert dep["name"] in kustomizations
    for path in [chart["chart"]] + [k["spec"]["path"] for k in kustomizations.values()]:
        top = path.removeprefix("./").split("/")[0]
        assert "/*" not in ignored or f"!/{top}/" in ignored, f"the GitRepository's ignore drops {path}"

    # The HelmRelease is applied by a Kustomization that waits for it, and the quickstart
    # waits for that one: the CRDs exist before the custom resources are applied.
    (installer,) = [k for k in kustomizations.values()
                    if release in docs_of(kubectl("kustomize", str(repo_path(k["spec"]["path"]))).stdout)]
    assert installer["spec"]["wait"] is True
    (quickstart,) = [k for k in kustomizations.values() if repo_path(k["spec"]["path"]) == EXAMPLES]
    assert {"name": installer["metadata"]["name"]} in quickstart["spec"]["dependsOn"]
    assert "postBuild" not in quickstart["spec"], "Flux would substitute the model's ${namespace} placeholders"


@pytest.mark.parametrize("tool", ["argocd", "flux"])
def test_the_values_they_set_pass_the_charts_schema(tool, tmp_path):
    if tool == "argocd":
        (values,) = [a["spec"]["source"]["helm"]["valuesObject"] for a in of_kind("Application")
                     if a["spec"]["source"].get("helm")]
    else:
        (values,) = [r["spec"]["values"] for r in of_kind("HelmRelease")]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = helm("template", "lepton-operator", str(CHART), "-f", str(path), check=False)
    assert out.returncode == 0, out.stderr


def test_kubectl_kustomize_builds_the_quickstart():
    built = docs_of(kubectl("kustomize", str(EXAMPLES)).stdout)
    expected = docs_of("\n---\n".join((EXAMPLES / f).read_text() for f in QUICKSTART))
    assert [(d["kind"], d["metadata"]["name"]) for d in built] == [
        ("LeptonJob", "mnist-mlp"), ("LeptonModel", "mnist"), ("PersistentVolumeClaim", "mnist-checkpoints")]
    assert built == expected


def test_kustomize_loads_no_file_from_outside_its_directory(tmp_path):
    """Why examples/kustomization.yaml sits next to the quickstart files: a kustomization
    under examples/gitops/ could not list ../../quickstart-leptonjob.yaml."""
    (tmp_path / "job.yaml").write_text((EXAMPLES / QUICKSTART[0]).read_text())
    inner = tmp_path / "gitops" / "quickstart"
    inner.mkdir(parents=True)
    (inner / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../../job.yaml"]}))
    out = kubectl("kustomize", str(inner), check=False)
    assert out.returncode != 0 and "is not in or below" in out.stderr, out.stdout + out.stderr
