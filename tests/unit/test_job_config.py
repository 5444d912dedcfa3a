"""Operator settings from the environment and flags."""
import pytest

from lepton_operator import config

pytestmark = pytest.mark.unit


def test_defaults_and_env():
    s = config.from_env({})
    assert s.all_namespaces and s.trainer_image == config.DEFAULT_TRAINER_IMAGE
    s = config.from_env({"LEPTON_NAMESPACES": "a, b,", "PROMETHEUS_URL": "http://p:9090/",
                         "LEPTON_TRAINER_IMAGE": "img:1", "LEPTON_RESYNC_SECONDS": "5"})
    assert s.namespaces == ("a", "b") and s.prometheus_url == "http://p:9090"
    assert s.trainer_image == "img:1" and s.resync_seconds == 5.0


def test_flags_override_env():
    s = config.from_env({"LEPTON_METRICS_PORT": "9000"}, metrics_port=9100, trainer_image=None)
    assert s.metrics_port == 9100 and s.trainer_image == config.DEFAULT_TRAINER_IMAGE


@pytest.mark.parametrize("value", ["abc", "-1", "0"])
def test_bad_numbers_are_clear_errors(value):
    with pytest.raises(ValueError, match="LEPTON_PROMETHEUS_TIMEOUT"):
        config.from_env({"LEPTON_PROMETHEUS_TIMEOUT": value})


def test_command_line_flags():
    from lepton_operator.__main__ import parse_args
    _, s = parse_args(["-n", "a", "--namespace", "b", "--metrics-port", "9100", "--trainer-image", "t:1"])
    assert s.namespaces == ("a", "b") and s.metrics_port == 9100 and s.trainer_image == "t:1"
    _, s = parse_args(["--all-namespaces"])
    assert s.all_namespaces
    for bad in (["-n", "a", "-A"], ["--health-port", "70000"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_lost_workers_are_reported_from_inside_the_cluster_unless_turned_off(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert not config.from_env({}).reports_lost_workers          # a laptop cannot reach the Service
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert config.from_env({}).reports_lost_workers               # in a pod
    assert not config.from_env({"LEPTON_REPORT_LOST_WORKERS": "false"}).reports_lost_workers
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert config.from_env({"LEPTON_REPORT_LOST_WORKERS": "true"}).reports_lost_workers
    with pytest.raises(ValueError, match="LEPTON_REPORT_LOST_WORKERS must be true or false"):
        config.from_env({"LEPTON_REPORT_LOST_WORKERS": "sometimes"})
    assert config.from_env({"POD_NAMESPACE": "lepton-system"}).operator_namespace == "lepton-system"


def test_the_operators_pod_labels_are_read_as_key_value_pairs():
    labels = config.from_env({"LEPTON_OPERATOR_POD_LABELS":
                              "app.kubernetes.io/name=lepton-operator, app.kubernetes.io/instance=lepton"})
    assert labels.operator_pod_labels == (("app.kubernetes.io/name", "lepton-operator"),
                                          ("app.kubernetes.io/instance", "lepton"))
    assert config.from_env({}).operator_pod_labels == ()           # the whole namespace
    for bad in ("app", "app=a b", "-app=x", "app=" + "x" * 64):
        with pytest.raises(ValueError, match="LEPTON_OPERATOR_POD_LABELS must be comma-separated key=value labels"):
            config.from_env({"LEPTON_OPERATOR_POD_LABELS": bad})
