"""The Lighthouse process starts without torch: it loads torchft's native extension alone,
so a replaced Lighthouse is up without the seconds of CPU an import of torch takes."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

PROBE = """
import json, sys, urllib.request
from lepton_trainer.lighthouse import native_lighthouse
server = native_lighthouse()(bind="127.0.0.1:0", min_replicas=1)
with urllib.request.urlopen(server.address() + "/status", timeout=10) as r:
    page = r.read().decode()
server.shutdown()
print(json.dumps({"torch": "torch" in sys.modules, "torchft": "torchft" in sys.modules,
                  "status_page": "quorum_id" in page}))
"""


def test_the_lighthouse_serves_without_importing_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"torch": False, "torchft": False, "status_page": True}, (seen, out.stderr)
