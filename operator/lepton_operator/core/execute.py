"""Execute a plan: the one place where a reconcile's writes go out, for both kinds.

A planner returns the whole next status, the events and a flat list of ``Action`` s.
``execute`` runs them in a fixed shape:

1. the status first, when the plan says it must be durable before an action
   (``Effects.persist_first``: a counted failure before the DELETE of the pod it
   counts, a scale event before the spec change it makes);
2. the actions, independent ones concurrently; an action's ``then`` runs after it
   succeeded (a PodTemplate before the ProvisioningRequest that names it);
3. the status, once: a merge patch of what changed, nothing on a no-op;
4. the plan's events and an event for each watched condition that changed.

Every kind's answers are handled the same way: a create that finds the object (409) or
a delete that finds none (404) is done; a 404 on an action that names ``missing_api``
means an optional API (KEDA's ScaledObject, say) is not installed and becomes one Warning event
instead of an error; a refusal (422, ``kube.Refused``) ends the reconcile and the loop
reports it as InvalidSpec; any other error ends the reconcile, to be retried. When an
action fails, the status of step 3 is not written: nothing is reported as done that
was not.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..constants import EVENT_WARNING
from . import kube
from . import status as st

if TYPE_CHECKING:
    from .loop import Memory

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Action:
    """One write to the API server. ``verb``: create, apply, patch or delete."""
    verb: str
    api_version: str
    kind: str
    name: str
    namespace: str | None = None
    body: Obj | None = None                 # the object (create, apply) or the patch (patch)
    then: tuple["Action", ...] = ()         # run after this one succeeded
    missing_api: str | None = None          # a 404 means this optional API is not installed

    @staticmethod
    def create(obj: Obj, then: tuple["Action", ...] = ()) -> "Action":
        return Action("create", *_coords(obj), body=obj, then=then)

    @staticmethod
    def apply(obj: Obj, then: tuple["Action", ...] = (), missing_api: str | None = None) -> "Action":
        return Action("apply", *_coords(obj), body=obj, then=then, missing_api=missing_api)

    @staticmethod
    def delete(api_version: str, kind: str, name: str, namespace: str | None,
               then: tuple["Action", ...] = ()) -> "Action":
        return Action("delete", api_version, kind, name, namespace, then=then)

    @staticmethod
    def patch(api_version: str, kind: str, name: str, namespace: str | None, body: Obj) -> "Action":
        return Action("patch", api_version, kind, name, namespace, body=body)


def _coords(obj: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
    meta = obj.get("metadata") or {}
    return obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")


@dataclasses.dataclass
class Effects:
    """What a plan asks of the API server, in the order ``execute`` follows."""
    status: dict[str, Any]
    actions: list[Action] = dataclasses.field(default_factory=list)
    events: list[st.Event] = dataclasses.field(default_factory=list)
    persist_first: bool = False


Result = tuple[Action, Any]        # (action, its answer or the exception it raised)


async def _send(action: Action) -> Any:
    if action.verb == "create":
        return await kube.aio(kube.create, action.body)
    if action.verb == "apply":
        return await kube.aio(kube.apply, action.body)
    if action.verb == "patch":
        return await kube.aio(kube.patch, action.api_version, action.kind, action.name, action.namespace,
                              action.body)
    if action.verb == "delete":
        return await kube.aio(kube.delete, action.api_version, action.kind, action.name, action.namespace)
    raise ValueError(f"unknown verb {action.verb!r}")


async def _chain(action: Action, out: list[Result]) -> None:
    """Run ``action`` and, once it succeeded, its ``then`` in order; record every answer."""
    try:
        result = await _send(action)
    except Exception as exc:  # noqa: BLE001 (every failure is recorded and judged together below)
        out.append((action, exc))
        return
    out.append((action, result))
    for follower in action.then:
        await _chain(follower, out)


async def run(actions: Iterable[Action]) -> list[Result]:
    """Send the actions concurrently (the API client is thread-safe); every answer,
    exceptions included, in the order the actions were given (followers after theirs)."""
    actions = list(actions)
    outs: list[list[Result]] = [[] for _ in actions]
    await asyncio.gather(*(_chain(a, o) for a, o in zip(actions, outs)))
    return [r for o in outs for r in o]


def missing_apis(results: Iterable[Result]) -> list[st.Event]:
    """A Warning event for each optional API an action found missing (404)."""
    return [(EVENT_WARNING, "AutoscalerAPIMissing",
             f"cannot create {a.kind} ({a.api_version}): the API is not installed")
            for a, r in results if a.missing_api and isinstance(r, kube.ApiException) and r.status == 404]


def first_failure(results: Iterable[Result]) -> BaseException | None:
    """The failure that ends the reconcile: a refusal first (it is reported, the others are
    retried), else the first error; an optional API's absence is no failure."""
    failed = [r for a, r in results if isinstance(r, BaseException)
              and not (a.missing_api and isinstance(r, kube.ApiException) and r.status == 404)]
    return next((r for r in failed if isinstance(r, kube.Refused)), failed[0] if failed else None)


async def execute(body: Mapping[str, Any], memory: "Memory", effects: Effects, logger: logging.Logger,
                  record: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Apply ``effects`` (see the module doc). ``record`` sees every answer before a failure
    is raised, so the caller's memory of what it created matches what exists."""
    old_conditions = memory.status.get("conditions")
    if effects.persist_first:
        await st.write(body, memory, effects.status)
    results = await run(effects.actions)
    if record is not None:
        record(results)
    failure = first_failure(results)
    if failure is not None:
        raise failure
    await st.write(body, memory, effects.status)
    await st.emit(body, memory, missing_apis(results), logger, once=True)
    decided = {reason for _, reason, _ in effects.events}
    waits = [e for e in st.transition_events(old_conditions, effects.status.get("conditions"))
             if e[1] not in decided]
    await st.emit(body, memory, list(effects.events) + waits, logger)
    return results
