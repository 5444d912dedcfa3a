"""LeptonJob: spec, state machine, child objects, handlers and the goodput autoscaler."""
