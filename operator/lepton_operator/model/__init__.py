"""LeptonModel: spec, rollout planner, child objects, handlers and the builtin autoscaler."""
