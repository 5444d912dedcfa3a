"""kopf handlers. Importing this package registers them, plus the operator-wide kopf settings."""
import logging

import kopf

from ..constants import GROUP
from . import job  # noqa: F401  (registers the LeptonJob handlers)
from . import model  # noqa: F401  (registers the LeptonModel handlers)
from . import autoscale  # noqa: F401  (registers the LeptonJob autoscaler)


@kopf.on.startup()
def _kopf_settings(settings: kopf.OperatorSettings, **_) -> None:
    """Events are posted by the operator itself (kube.emit_event), not for every log line."""
    settings.posting.enabled = False
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
