"""Importing this module registers every kopf handler, plus the operator-wide kopf settings."""
import logging

import kopf

from . import config
from .core.kube import REQUEST_TIMEOUT
from .job import handlers as _job_handlers  # noqa: F401  (registers the LeptonJob handlers)
from .model import handlers as _model_handlers  # noqa: F401  (registers the LeptonModel handlers)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base is the last handled state its change handlers (``kopf.on.create``,
    ``on.update``, ``on.resume``) compare an object against. The operator has none: every
    handler follows watch events (``kopf.on.event``, ``kopf.index``) and the loops diff what
    they need themselves, so no diff base is kept or built. kopf's own builds one for every
    event of every watched object, pods included, from a deep copy of the whole body."""

    def fetch(self, *, body):
        return None

    def build(self, *, body, extra_fields=None):
        return None

    def store(self, *, body, patch, essence) -> None:
        return None


@kopf.on.startup()
def kopf_settings(settings: kopf.OperatorSettings, **_) -> None:
    """Events are posted by the operator itself (core.status.emit), not for every log line.
    No handler needs a finalizer (the loops follow watch events, see core.loop), so kopf puts
    none on the objects.
    Watching named namespaces, kopf does not scan cluster-wide for namespaces and CRDs,
    which a namespaced Role does not grant. No handler reacts to changes, so kopf keeps no
    diff base (``NoDiffBase``)."""
    if not config.get().all_namespaces:
        settings.scanning.disabled = True
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # kopf's own short requests end as the operator's do (core.kube.REQUEST_TIMEOUT)
    settings.networking.connect_timeout, settings.networking.request_timeout = REQUEST_TIMEOUT[0], sum(REQUEST_TIMEOUT)
