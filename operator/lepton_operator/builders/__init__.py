"""Pure builders: specs in, plain Kubernetes object dicts out (no API client imported)."""
from __future__ import annotations

from typing import Any, Mapping


def owner_reference(owner: Mapping[str, Any], controller: bool = True) -> dict[str, Any]:
    """An ownerReference to ``owner`` (a resource body), so deleting the owner deletes the child."""
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": controller, "blockOwnerDeletion": True}
