"""Operator settings, read from the environment and overridable by command-line flags.

Environment variables (all optional):

=============================  =============================================  ========================
variable                       meaning                                        default
=============================  =============================================  ========================
LEPTON_NAMESPACES              comma-separated namespaces to watch; empty     "" (all namespaces)
                               means all namespaces
LEPTON_TRAINER_IMAGE           image for workers, rendezvous, compression     see DEFAULT_TRAINER_IMAGE
                               and serving when a spec names none
LEPTON_IMAGE_PULL_POLICY       imagePullPolicy of the pods the operator makes IfNotPresent
PROMETHEUS_URL                 Prometheus HTTP API base URL                   http://localhost:9090
LEPTON_PROMETHEUS_TIMEOUT      seconds per Prometheus query                   2.0
LEPTON_METRICS_PORT            port of the operator's own /metrics            8000
LEPTON_HEALTH_PORT             port of the liveness endpoint /healthz         8080
LEPTON_RESYNC_SECONDS          longest wait between two reconciles of an      60
                               object when nothing changes
LEPTON_API_RETRY_SECONDS       delay before retrying after an API error       5
=============================  =============================================  ========================
"""
from __future__ import annotations

import dataclasses
import os

DEFAULT_TRAINER_IMAGE = "ghcr.io/lepton-operator/lepton-trainer:0.1.0"


@dataclasses.dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    prometheus_url: str = "http://localhost:9090"
    prometheus_timeout: float = 2.0
    metrics_port: int = 8000
    health_port: int = 8080
    resync_seconds: float = 60.0
    api_retry_seconds: float = 5.0

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces


def _float(env: dict[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{key} must be positive, got {raw!r}")
    return value


def from_env(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Settings from ``env`` (default ``os.environ``); keyword overrides (flags) win."""
    env = dict(os.environ if env is None else env)
    settings = Settings(
        namespaces=tuple(n.strip() for n in env.get("LEPTON_NAMESPACES", "").split(",") if n.strip()),
        trainer_image=env.get("LEPTON_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
        image_pull_policy=env.get("LEPTON_IMAGE_PULL_POLICY") or "IfNotPresent",
        prometheus_url=(env.get("PROMETHEUS_URL") or "http://localhost:9090").rstrip("/"),
        prometheus_timeout=_float(env, "LEPTON_PROMETHEUS_TIMEOUT", 2.0),
        metrics_port=int(_float(env, "LEPTON_METRICS_PORT", 8000)),
        health_port=int(_float(env, "LEPTON_HEALTH_PORT", 8080)),
        resync_seconds=_float(env, "LEPTON_RESYNC_SECONDS", 60.0),
        api_retry_seconds=_float(env, "LEPTON_API_RETRY_SECONDS", 5.0),
    )
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


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
