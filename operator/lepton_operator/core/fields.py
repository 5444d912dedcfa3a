"""Typed spec parsing shared by LeptonJob and LeptonModel (pure).

Each helper reads one field, checks its type and bounds, appends a message naming the
field to ``problems`` when it is wrong, and returns a usable default so parsing goes
on: a spec parser reports every problem at once in one ``InvalidSpec``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class InvalidSpec(ValueError):
    """A spec that no retry will fix; ``problems`` lists every rule it breaks."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class Resources:
    """GPUs per pod, and CPU and memory as Kubernetes quantities (None: not set)."""
    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None


def integer(raw: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int | None,
            problems: list[str], where: str) -> int | None:
    """``raw[key]`` as an int within ``lo..hi`` (``hi`` None: no upper bound)."""
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}{key} must be an integer, got {value!r}")
        return default
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        problems.append(f"{where}{key} must be {bound}, got {value}")
        return default
    return value


def number(raw: Mapping[str, Any], key: str, default: float | None, lo: float | None, hi: float | None,
           problems: list[str], where: str, lo_open: bool = False) -> float | None:
    """``raw[key]`` as a float within the bounds (``lo_open``: strictly above ``lo``)."""
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where}{key} must be a number, got {value!r}")
        return default
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        problems.append(f"{where}{key} must be {'>' if lo_open else '>='} {lo}"
                        + (f" and <= {hi}" if hi is not None else "") + f", got {value}")
        return default
    return float(value)


def choice(value: Any, allowed: tuple[str, ...], problems: list[str], where: str) -> str:
    """``value`` if it is one of ``allowed``, else the first allowed value (and a problem)."""
    if value not in allowed:
        problems.append(f"{where} must be one of {', '.join(allowed)}; got {value!r}")
        return allowed[0]
    return value


def quantity(value: Any) -> str | None:
    """A Kubernetes quantity as a string (the API server validates its syntax)."""
    return None if value is None else str(value)


def resources(raw: Mapping[str, Any] | None, problems: list[str], where: str) -> Resources:
    """``{gpus, cpu, memory}`` -> Resources."""
    raw = raw or {}
    return Resources(integer(raw, "gpus", 0, 0, 64, problems, where),
                     quantity(raw.get("cpu")), quantity(raw.get("memory")))


def string_map(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> dict[str, str]:
    """``raw[key]`` as a map of names to strings (labels, annotations)."""
    value = raw.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        problems.append(f"{where}{key} must map names to strings")
        return {}
    return dict(value)


@dataclasses.dataclass(frozen=True)
class NetworkPolicySpec:
    """``spec.networkPolicy``: whether the operator makes NetworkPolicies for the pods it
    runs, and the peers (core NetworkPolicyPeer objects) that may reach their exposed ports
    (the serving ports, the workers' metrics port). No peers: any source may reach those
    ports, and nothing else."""
    enabled: bool = False
    ingress_from: tuple[Mapping[str, Any], ...] = ()


PEER_KEYS = ("podSelector", "namespaceSelector", "ipBlock")


def network_policy(raw: Any, problems: list[str], where: str = "networkPolicy") -> NetworkPolicySpec:
    """``{enabled, ingressFrom}`` -> NetworkPolicySpec. Each peer sets podSelector and/or
    namespaceSelector, or ipBlock alone (with a cidr), as the NetworkPolicy API requires."""
    if raw is None:
        return NetworkPolicySpec()
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be an object, got {raw!r}")
        return NetworkPolicySpec()
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        problems.append(f"{where}.enabled must be true or false, got {enabled!r}")
        enabled = False
    peers = raw.get("ingressFrom") or []
    if not isinstance(peers, list):
        problems.append(f"{where}.ingressFrom must be a list of NetworkPolicyPeer objects")
        peers = []
    for i, peer in enumerate(peers):
        at = f"{where}.ingressFrom[{i}]"
        if not isinstance(peer, Mapping):
            problems.append(f"{at} must be an object (a NetworkPolicyPeer)")
            continue
        unknown = sorted(set(peer) - set(PEER_KEYS))
        if unknown:
            problems.append(f"{at} has unknown fields {unknown}; a peer has {', '.join(PEER_KEYS)}")
        if not any(k in peer for k in PEER_KEYS):
            problems.append(f"{at} must set podSelector, namespaceSelector or ipBlock")
        if "ipBlock" in peer:
            if "podSelector" in peer or "namespaceSelector" in peer:
                problems.append(f"{at}: ipBlock cannot be combined with podSelector or namespaceSelector")
            block = peer["ipBlock"]
            if not isinstance(block, Mapping) or not isinstance(block.get("cidr"), str) or not block["cidr"]:
                problems.append(f"{at}.ipBlock.cidr is required (e.g. 10.0.0.0/8)")
    return NetworkPolicySpec(enabled, tuple(dict(p) for p in peers if isinstance(p, Mapping)))


def validate_name(name: str, max_len: int, suffix_len: int) -> list[str]:
    """Problems with ``name`` as the prefix of child object names (Services, pod host
    names: DNS-1035 labels) that add up to ``suffix_len`` characters."""
    problems = []
    if "." in name:
        problems.append(f"metadata.name {name!r} must not contain dots: it prefixes Service "
                        "and pod host names, which are DNS labels")
    elif not DNS1035.match(name):
        problems.append(f"metadata.name {name!r} must start with a letter and contain only "
                        "lowercase letters, digits and '-'")
    if len(name) > max_len:
        problems.append(f"metadata.name must be at most {max_len} characters "
                        f"(child names add up to {suffix_len}), got {len(name)}")
    return problems


def valid_claim_name(claim: str) -> bool:
    """A PersistentVolumeClaim name (DNS-1123 subdomain)."""
    return bool(DNS1123.match(claim)) and len(claim) <= 253


__all__ = ["InvalidSpec", "Resources", "NetworkPolicySpec", "integer", "number", "choice", "quantity",
           "resources", "string_map", "network_policy", "validate_name", "valid_claim_name"]
