"""Operator settings: one list (``SETTINGS``), read from the environment and overridable
by command-line flags.

Each setting names its environment variable, its flag (if any), its default and what it
means; ``Settings``, the flags of ``__main__`` and the Helm chart's settings table
(charts/lepton-operator/README.md, checked against this list by the chart tests) all
come from it. Run ``python -m lepton_operator.config`` to print the table.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

DEFAULT_TRAINER_IMAGE = "ghcr.io/lepton-operator/lepton-trainer:0.1.0"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
PULL_POLICIES = ("IfNotPresent", "Always", "Never")


def _names(raw: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _positive(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _port(raw: str) -> int:
    value = int(float(raw))
    if not 0 <= value < 65536:
        raise ValueError("must be in 0..65535 (0: off)")
    return value


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool(raw: str) -> bool:
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError("must be true or false")


def _dns_name(raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", raw):
        raise ValueError("must be a lowercase DNS name")
    return raw


_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def _labels(raw: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key=value`` -> ((key, value), ...), each a valid label."""
    pairs = []
    for item in _names(raw):
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.fullmatch(key.strip()) or not _LABEL_VALUE.fullmatch(value.strip()):
            raise ValueError("must be comma-separated key=value labels")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _auto_bool(raw: str) -> bool | str:
    return "auto" if raw.strip().lower() == "auto" else _bool(raw)


def _pull_policy(raw: str) -> str:
    if raw not in PULL_POLICIES:
        raise ValueError(f"must be one of {', '.join(PULL_POLICIES)}")
    return raw


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str                      # the Settings field
    env: str                       # its environment variable
    default: Any
    parse: Callable[[str], Any]    # env text -> value (raises ValueError with the rule)
    help: str
    flag: str | None = None        # its command-line flag, if it has one
    aliases: tuple[str, ...] = ()  # other variables read when ``env`` is unset: older names,
                                   # and the downward-API variables a pod gets from the chart

    @property
    def is_switch(self) -> bool:
        """A boolean setting: its flag alone means true (``--leader-elect``)."""
        return self.parse is _bool


SETTINGS: tuple[Setting, ...] = (
    Setting("namespaces", "LEPTON_NAMESPACES", (), _names,
            "comma-separated namespaces to watch; empty: all namespaces"),
    Setting("trainer_image", "LEPTON_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE, str,
            "image of workers, the rendezvous store, compression and serving when a spec names none",
            flag="--trainer-image"),
    Setting("image_pull_policy", "LEPTON_IMAGE_PULL_POLICY", "IfNotPresent", _pull_policy,
            "imagePullPolicy of the pods the operator makes when a spec names none",
            flag="--image-pull-policy"),
    Setting("vllm_image", "LEPTON_VLLM_IMAGE", DEFAULT_VLLM_IMAGE, str,
            "image of a language model's serving pods with `serving.runtime: vllm` when the spec names none "
            "(vLLM's OpenAI server)", flag="--vllm-image"),
    Setting("prometheus_url", "LEPTON_PROMETHEUS_URL", "", lambda raw: raw.rstrip("/"),
            "Prometheus HTTP API base URL; empty: no Prometheus (specs that need it are invalid)",
            flag="--prometheus-url", aliases=("PROMETHEUS_URL",)),
    Setting("prometheus_timeout", "LEPTON_PROMETHEUS_TIMEOUT", 2.0, _positive, "seconds per Prometheus query"),
    Setting("metrics_port", "LEPTON_METRICS_PORT", 8000, _port, "port of the operator's own /metrics (0: off)",
            flag="--metrics-port"),
    Setting("health_port", "LEPTON_HEALTH_PORT", 8080, _port, "port of the liveness endpoint /healthz (0: off)",
            flag="--health-port"),
    Setting("resync_seconds", "LEPTON_RESYNC_SECONDS", 60.0, _positive,
            "longest wait between two reconciles of an object when nothing changes"),
    Setting("status_heartbeat_seconds", "LEPTON_STATUS_HEARTBEAT_SECONDS", 60.0, _positive,
            "how old an object's `status.reconciledAt` (the RECONCILED column) may grow before the "
            "operator refreshes it; it is also set with every status write, so a no-op reconcile "
            "writes nothing in between. Older than this: no operator is reconciling the object"),
    Setting("api_retry_seconds", "LEPTON_API_RETRY_SECONDS", 5.0, _positive,
            "delay before a reconcile is retried after an API error"),
    Setting("progress_interval", "LEPTON_PROGRESS_INTERVAL_SECONDS", 15.0, _positive,
            "with Prometheus, how often a Running job's step (lepton_train_step) is read to tell whether "
            "training makes progress"),
    Setting("stall_seconds", "LEPTON_STALL_SECONDS", 30.0, _positive,
            "the shortest time a Running job may go without a step before it is reported stalled "
            "(Ready=False, reason TrainingStalled); the window is ten of the job's own mean step "
            "intervals when that is longer"),
    Setting("compression_progress_seconds", "LEPTON_COMPRESSION_PROGRESS_SECONDS", 10.0, _positive,
            "while a compression pod is Running, how often the tail of its log is read (`pods/log` `get`) "
            "for the program's last progress line, shown in `status.compression.progress`; no read while "
            "nothing compresses"),
    Setting("cluster_gpu_usage", "LEPTON_CLUSTER_GPU_USAGE", False, _bool,
            "watching named namespaces, read the requests (GPUs, cpu, memory) of pods in every namespace "
            "(list and watch of pods cluster-wide, read-only), so capacity used outside the watched "
            "namespaces is never counted as free; false: only the watched namespaces' pods are counted "
            "(a namespaced Role suffices), and GPUs, cpu and memory that pods elsewhere use are invisible: "
            "the operator may plan workers that then stay Pending (the scheduler still never overcommits "
            "a node). Watching all namespaces, every pod is counted either way"),
    Setting("report_lost_workers", "LEPTON_REPORT_LOST_WORKERS", "auto", _auto_bool,
            "tell a job's rendezvous store as soon as one of its workers is lost (pod deleted, failed or "
            "gone), so that the others re-form at once instead of after the keep-alive timeout; `auto`: "
            "when the operator runs in a pod (`$KUBERNETES_SERVICE_HOST` set) and can reach the store's "
            "Service"),
    Setting("operator_namespace", "LEPTON_OPERATOR_NAMESPACE", "", _dns_name,
            "the operator's namespace: with `spec.networkPolicy`, pods of this namespace may reach the "
            "stores' report port; empty: `$POD_NAMESPACE` (the chart sets it), else none may",
            aliases=("POD_NAMESPACE",)),
    Setting("operator_pod_labels", "LEPTON_OPERATOR_POD_LABELS", (), _labels,
            "comma-separated `key=value` labels of the operator's pods (the chart sets its selector "
            "labels): with them, only those pods of the operator's namespace may reach the stores' "
            "report port; empty: every pod of that namespace"),
    Setting("leader_election", "LEPTON_LEADER_ELECTION", False, _bool,
            "run as one of several replicas: only the holder of a coordination.k8s.io/v1 Lease "
            "reconciles, the others wait and take over once it stops renewing (lease 15 s, renew "
            "deadline 10 s, retry 2 s); a holder that cannot renew exits with status 1",
            flag="--leader-elect"),
    Setting("leader_election_name", "LEPTON_LEADER_ELECTION_NAME", "lepton-operator", _dns_name,
            "name of that Lease", flag="--leader-election-name"),
    Setting("leader_election_namespace", "LEPTON_LEADER_ELECTION_NAMESPACE", "", _dns_name,
            "namespace of that Lease; empty: `$POD_NAMESPACE` (the chart sets it from the downward API), "
            "else `default`", flag="--leader-election-namespace", aliases=("POD_NAMESPACE",)),
    Setting("leader_election_identity", "LEPTON_LEADER_ELECTION_IDENTITY", "", str,
            "this replica's name in the Lease, to which each process adds a random suffix; empty: "
            "`$POD_NAME` (the chart sets it from the downward API), else the host name",
            aliases=("POD_NAME",)),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    vllm_image: str = DEFAULT_VLLM_IMAGE
    prometheus_url: str = ""
    prometheus_timeout: float = 2.0
    metrics_port: int = 8000
    health_port: int = 8080
    resync_seconds: float = 60.0
    status_heartbeat_seconds: float = 60.0
    api_retry_seconds: float = 5.0
    progress_interval: float = 15.0
    stall_seconds: float = 30.0
    compression_progress_seconds: float = 10.0
    cluster_gpu_usage: bool = False
    report_lost_workers: bool | str = "auto"
    operator_namespace: str = ""
    operator_pod_labels: tuple[tuple[str, str], ...] = ()
    leader_election: bool = False
    leader_election_name: str = "lepton-operator"
    leader_election_namespace: str = ""
    leader_election_identity: str = ""

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces

    @property
    def reports_lost_workers(self) -> bool:
        if self.report_lost_workers == "auto":
            return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return bool(self.report_lost_workers)

    @property
    def prometheus_enabled(self) -> bool:
        """Autoscaling from Prometheus and canary analysis need a Prometheus URL."""
        return bool(self.prometheus_url)


def from_env(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Settings from ``env`` (default ``os.environ``); keyword overrides (flags) win.
    An unset or empty variable keeps the default; a bad value is a ValueError naming it."""
    env = dict(os.environ if env is None else env)
    values = {}
    for s in SETTINGS:
        key = next((k for k in (s.env, *s.aliases) if env.get(k, "") != ""), None)
        if key is None:
            continue
        try:
            values[s.name] = s.parse(env[key])
        except ValueError as exc:
            raise ValueError(f"{key} {exc if str(exc).startswith('must') else 'must be a valid value'}, "
                             f"got {env[key]!r}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def table() -> str:
    """The settings as a Markdown table (the chart README's copy is checked against it)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        default = str(default).lower() if isinstance(default, bool) else default
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        rows.append(f"| `{s.env}` | {f'`{s.flag}`' if s.flag else ''} | {shown} | {s.help} |")
    return "\n".join(rows)


_current: Settings | None = None


def get() -> Settings:
    """The process-wide settings (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = from_env()
    return _current


def configure(settings: Settings) -> Settings:
    """Install ``settings`` as the process-wide settings (done once by ``__main__``)."""
    global _current
    _current = settings
    return settings


if __name__ == "__main__":
    print(table())
