"""Plans from plain arguments, for the planner tests: each builds the frozen observation
(``job.state.JobObserved``, ``model.state.ModelObserved``) that the operator's ``observe``
builds from the cluster, and calls the one public planner of its kind."""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Mapping

from lepton_operator.job import state as js
from lepton_operator.model import state as ms


def plan_job(meta: Mapping[str, Any], spec, prev: Mapping[str, Any] | None, pods: Iterable[js.PodView],
             free_slots: int, now: dt.datetime, handled_uids: Iterable[str] = (), vanished: int = 0,
             selector: str = "", template: str = "", no_node_fits: bool = False,
             store: js.StoreView | None = None, request: js.CapacityRequestView | None = None,
             stalled: str = "") -> js.Plan:
    """``job.state.plan`` of the job ``meta`` whose workers are ``pods`` exactly as given.
    ``selector`` is what the planner derives from the job's name (checked here);
    ``template`` the hash of the spec's worker template as the observation gives it;
    ``stalled`` the stall verdict of the last reading of the job's step (``job.progress``)."""
    meta = {"namespace": "ns", "uid": "uid", **meta}
    assert not selector or selector == f"lepton.ai/job={meta['name']},lepton.ai/role=worker", selector
    observed = js.JobObserved(meta=meta, status=prev, workers=js.Workers.of(pods, vanished), now=now, template=template,
                              free_slots=free_slots, no_node_fits=no_node_fits, store=store, request=request,
                              handled_uids=frozenset(handled_uids),
                              progress=js.progress.Progress(stalled=stalled))
    return js.plan(spec, observed)


def plan_model(spec, name: str, prev: Mapping[str, Any], source: ms.SourceState, revision: str | None,
               comp: ms.CompressionState | None, total: int, deployments: Mapping[str, ms.DeploymentView],
               now: float, analysis: list | None = None, hold_stable: bool = False, decision: str | None = None,
               traffic: float | None = None, namespace: str = "ns") -> ms.Plan:
    """``model.state.revisions`` (the rollout decisions of ``model.state.plan``) from plain
    arguments."""
    return ms.revisions(spec, name, prev, source, revision, comp, total, deployments, now, analysis=analysis,
                        hold_stable=hold_stable, decision=decision, traffic=traffic, namespace=namespace)
