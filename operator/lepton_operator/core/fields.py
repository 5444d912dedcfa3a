"""Typed spec parsing shared by LeptonJob and LeptonModel (pure).

Each helper reads one field, checks its type and bounds, appends a message naming the
field to ``problems`` when it is wrong, and returns a usable default so parsing goes
on: a spec parser reports every problem at once in one ``InvalidSpec``. A field's default
is the default of its dataclass field, which a parser reads with ``default``.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from typing import Any, Callable, Mapping, TypeVar


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A label (or annotation) key's name part and a label value, as the API server checks them.
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
TOLERATION_OPERATORS = ("Equal", "Exists")
TAINT_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
P = TypeVar("P")


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


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (a fresh value where the field
    has a ``default_factory``): the one place a spec's default lives, which the parsers
    read. A field without a default raises LookupError, which ``parser`` does not turn
    into an ``InvalidSpec``."""
    field = _fields(cls).get(name)
    if field is None:
        raise LookupError(f"{cls.__name__} has no field {name!r}")
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise LookupError(f"{cls.__name__}.{name} has no default")


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def parser(fn: Callable[..., P]) -> Callable[..., P]:
    """A spec parser raises ``InvalidSpec`` and nothing else. The helpers below check each
    field's type; a value of a type none of them expected (the API server's structural
    schema refuses those before the operator sees them) is reported, not raised."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> P:
        try:
            return fn(*args, **kwargs)
        except InvalidSpec:
            raise
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            raise InvalidSpec([f"spec has a value of the wrong type ({type(exc).__name__}: {exc}); "
                               "kubectl apply checks types against the CRD"]) from exc
    return wrapper


def mapping(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> dict[str, Any]:
    """``raw[key]`` as an object (unset or null: empty)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{where}{key} must be an object, got {value!r}")
        return {}
    return dict(value)


def items(raw: Mapping[str, Any], key: str, problems: list[str], where: str,
          of: type = Mapping, what: str = "an object") -> tuple[Any, ...]:
    """``raw[key]`` as a list whose items are ``of`` (unset or null: empty); wrong items are
    reported and left out."""
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{where}{key} must be a list, got {value!r}")
        return ()
    for i, item in enumerate(value):
        if not isinstance(item, of) or isinstance(item, bool) and of is not bool:
            problems.append(f"{where}{key}[{i}] must be {what}, got {item!r}")
    return tuple(item for item in value if isinstance(item, of) and not (isinstance(item, bool) and of is not bool))


def text(raw: Mapping[str, Any], key: str, problems: list[str], where: str,
         default: str | None = None) -> str | None:
    """``raw[key]`` as a string (unset, null or empty: ``default``)."""
    value = raw.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        problems.append(f"{where}{key} must be a string, got {value!r}")
        return default
    return value


def flag(raw: Mapping[str, Any], key: str, default: bool, problems: list[str], where: str) -> bool:
    """``raw[key]`` as true or false (unset or null: ``default``)."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        problems.append(f"{where}{key} must be true or false, got {value!r}")
        return default
    return value


def integer(raw: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int | None,
            problems: list[str], where: str) -> int | None:
    """``raw[key]`` as an int within ``lo..hi`` (``hi`` None: no upper bound; unset or null:
    ``default``, as the API server prunes a null)."""
    value = raw.get(key)
    if value is None:
        return default
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
    value = raw.get(key)
    if value is None:
        return default
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


def resources(raw: Any, problems: list[str], where: str) -> Resources:
    """``{gpus, cpu, memory}`` -> Resources."""
    if raw is not None and not isinstance(raw, Mapping):
        problems.append(f"{where.rstrip('.')} must be an object, got {raw!r}")
        raw = None
    raw = raw or {}
    return Resources(integer(raw, "gpus", default(Resources, "gpus"), 0, 64, problems, where),
                     quantity(raw.get("cpu")), quantity(raw.get("memory")))


def string_map(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> dict[str, str]:
    """``raw[key]`` as a map of names to strings (labels, annotations)."""
    value = raw.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        problems.append(f"{where}{key} must map names to strings")
        return {}
    return dict(value)


def label_key_problem(key: Any) -> str | None:
    """Why ``key`` is no label key (``[prefix/]name``: a DNS subdomain of at most 253
    characters, a name of at most 63), or None."""
    if not isinstance(key, str):
        return "must be a string"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not DNS1123.match(prefix)):
        return "has a prefix that is no DNS subdomain"
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        return ("must be at most 63 characters of letters, digits, '-', '_' and '.', "
                "beginning and ending with a letter or digit (with an optional DNS prefix and '/')")
    return None


def label_value_problem(value: Any) -> str | None:
    """Why ``value`` is no label value (empty, or at most 63 characters as a name), or None."""
    if not isinstance(value, str):
        return "must be a string"
    if value and (len(value) > 63 or not LABEL_NAME.match(value)):
        return "must be empty or at most 63 characters of letters, digits, '-', '_' and '.', " \
               "beginning and ending with a letter or digit"
    return None


def node_selector(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> dict[str, str]:
    """``raw[key]`` as a node selector: label keys to label values, as the Pod API checks them."""
    selector = mapping(raw, key, problems, where)
    for k, v in selector.items():
        if (why := label_key_problem(k)):
            problems.append(f"{where}{key} key {k!r} {why}")
        elif (why := label_value_problem(v)):
            problems.append(f"{where}{key}[{k!r}] {why}, got {v!r}")
    return {k: v for k, v in selector.items() if isinstance(v, str)}


def tolerations(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> tuple[dict, ...]:
    """``raw[key]`` as core/v1 Tolerations, checked as the Pod API checks them."""
    out = items(raw, key, problems, where, Mapping, "a toleration object")
    for i, t in enumerate(out):
        at = f"{where}{key}[{i}]"
        op = t.get("operator") or "Equal"
        if op not in TOLERATION_OPERATORS:
            problems.append(f"{at}.operator must be Exists or Equal, got {op!r}")
        if t.get("key"):
            if (why := label_key_problem(t["key"])):
                problems.append(f"{at}.key {why}")
        elif op != "Exists":
            problems.append(f"{at}.operator must be Exists when key is empty (it tolerates every taint)")
        if op == "Exists" and t.get("value"):
            problems.append(f"{at}.value must be empty when operator is Exists")
        elif op == "Equal" and (why := label_value_problem(t.get("value") or "")):
            problems.append(f"{at}.value {why}")
        if (t.get("effect") or "") not in TAINT_EFFECTS:
            problems.append(f"{at}.effect must be one of NoSchedule, PreferNoSchedule, NoExecute or empty")
        if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
            problems.append(f"{at}.tolerationSeconds needs effect NoExecute")
    return tuple(dict(t) for t in out)


def pod_security_context(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> dict[str, Any]:
    """``raw[key]`` as overrides of a pod securityContext."""
    sc = mapping(raw, key, problems, where)
    _seccomp(sc, problems, f"{where}{key}")
    return sc


def _seccomp(sc: Mapping[str, Any], problems: list[str], where: str) -> None:
    """A seccompProfile names a localhostProfile exactly when its type is Localhost."""
    profile = sc.get("seccompProfile")
    if not isinstance(profile, Mapping):
        return
    if (profile.get("type") == "Localhost") != bool(profile.get("localhostProfile")):
        problems.append(f"{where}.seccompProfile.localhostProfile is required when type is Localhost, "
                        "and only then")


def security_context(raw: Mapping[str, Any], key: str, problems: list[str], where: str) -> dict[str, Any]:
    """``raw[key]`` as overrides of a container securityContext. The Pod API refuses
    ``privileged: true`` (or adding CAP_SYS_ADMIN) together with
    ``allowPrivilegeEscalation: false``; the operator's default of false gives way to
    either (``objects.container_security``), an explicit false is an error."""
    sc = mapping(raw, key, problems, where)
    _seccomp(sc, problems, f"{where}{key}")
    if sc.get("allowPrivilegeEscalation") is False and escalates(sc):
        problems.append(f"{where}{key}: allowPrivilegeEscalation false cannot go with privileged true "
                        "or capabilities.add CAP_SYS_ADMIN")
    return sc


def escalates(sc: Mapping[str, Any]) -> bool:
    """Whether a securityContext asks for what implies privilege escalation."""
    caps = sc.get("capabilities") if isinstance(sc.get("capabilities"), Mapping) else {}
    return sc.get("privileged") is True or "CAP_SYS_ADMIN" in (caps.get("add") or ())


@dataclasses.dataclass(frozen=True)
class NetworkPolicySpec:
    """``spec.networkPolicy``: whether the operator makes NetworkPolicies for the pods it
    runs, and the peers (core NetworkPolicyPeer objects) that may reach their exposed ports
    (the serving ports, the workers' metrics port). No peers: any source may reach those
    ports, and nothing else."""
    enabled: bool = False
    ingress_from: tuple[Mapping[str, Any], ...] = ()


PEER_KEYS = ("podSelector", "namespaceSelector", "ipBlock")


def network_policy(raw: Any, problems: list[str], where: str = "networkPolicy",
                   cls: type[NetworkPolicySpec] = NetworkPolicySpec) -> NetworkPolicySpec:
    """``{enabled, ingressFrom}`` -> ``cls`` (NetworkPolicySpec or a subclass that declares
    another default for ``enabled``). Each peer sets podSelector and/or namespaceSelector,
    or ipBlock alone (with a cidr), as the NetworkPolicy API requires."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be an object, got {raw!r}")
        return cls()
    off = default(cls, "enabled")
    enabled = raw.get("enabled", off)
    if not isinstance(enabled, bool):
        problems.append(f"{where}.enabled must be true or false, got {enabled!r}")
        enabled = off
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
            else:
                _ip_block(block, problems, f"{at}.ipBlock")
    return cls(enabled, tuple(dict(p) for p in peers if isinstance(p, Mapping)))


def _ip_block(block: Mapping[str, Any], problems: list[str], at: str) -> None:
    """An ipBlock's cidr and its except ranges: CIDRs, each except range inside cidr."""
    try:
        cidr = ipaddress.ip_network(block["cidr"], strict=False)
    except ValueError:
        problems.append(f"{at}.cidr must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32, got {block['cidr']!r}")
        return
    for j, ex in enumerate(block.get("except") or ()):
        try:
            inner = ipaddress.ip_network(ex, strict=False)
        except (TypeError, ValueError):
            problems.append(f"{at}.except[{j}] must be a CIDR, got {ex!r}")
            continue
        if inner.version != cidr.version or not inner.subnet_of(cidr) \
                or inner.prefixlen <= cidr.prefixlen:   # type: ignore[arg-type]
            problems.append(f"{at}.except[{j}] ({ex}) must be a strict subset of cidr {block['cidr']}")


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


__all__ = ["InvalidSpec", "Resources", "NetworkPolicySpec", "default", "parser", "mapping", "items", "text", "flag",
           "integer", "number", "choice", "quantity", "resources", "string_map", "node_selector", "tolerations",
           "security_context", "pod_security_context", "escalates", "label_key_problem", "label_value_problem", "network_policy",
           "validate_name", "valid_claim_name"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one role's pods may run (core/v1 fields, checked as the Pod API checks them).
    Unset, a pod that asks for no GPU avoids GPU nodes (``core.objects.placement``)."""
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None


def placement(raw: Mapping[str, Any], problems: list[str], where: str) -> Placement:
    """``nodeSelector``, ``tolerations``, ``affinity`` and ``priorityClassName`` of ``raw``."""
    return Placement(node_selector(raw, "nodeSelector", problems, where),
                     tolerations(raw, "tolerations", problems, where),
                     mapping(raw, "affinity", problems, where) or None,
                     text(raw, "priorityClassName", problems, where))
