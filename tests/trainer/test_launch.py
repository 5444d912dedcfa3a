"""``python -m lepton_trainer.launch``: torchrun's agent, with workers forked warm.

Each test runs the launcher and torchrun itself on the same program, as real processes,
and compares what the program sees: its environment, ``sys.argv``, ``__name__`` and exit
status must be torchrun's; only the start differs (forked from a forkserver that has
imported torch). tests/e2e/test_contract.py runs the operator-built command through a
lost worker, and tests/real in the trainer image.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_trainer import launch

pytestmark = pytest.mark.trainer

PROGRAM = '''
import json, os, sys
out = os.path.join(os.environ["OUT"], f"rank{os.environ['RANK']}-restart{os.environ['TORCHELASTIC_RESTART_COUNT']}.json")
with open(out, "w") as f:
    json.dump({"argv": sys.argv[1:], "name": __name__, "env": {k: os.environ[k] for k in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR")},
        "warm": "torch._dynamo" in sys.modules, "pid": os.getpid(), "ppid": os.getppid()}, f)
sys.exit(int(os.environ.get("EXIT_CODE", "0")) if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" else 0)
'''


def run(tmp_path: Path, launcher: list[str], program: list[str], *, nproc: int = 2, restarts: int = 0,
        exit_code: int = 0) -> tuple[int, dict[str, dict], str]:
    out = tmp_path / launcher[-1].replace(".", "-")
    out.mkdir()
    cmd = [sys.executable, "-m", *launcher, "--nnodes=1", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", *program]
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "EXIT_CODE": str(exit_code), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    seen = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return done.returncode, seen, done.stderr


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM)
    return path


@pytest.mark.parametrize("form", ["script", "module"])
def test_a_program_sees_what_torchrun_gives_it_and_starts_warm(tmp_path, script, form):
    program = [str(script)] if form == "script" else ["-m", "prog"]
    rc_t, torchrun, _ = run(tmp_path, ["torch.distributed.run"], [*program, "--lr", "-m", "x"])
    rc_l, ours, err = run(tmp_path, ["lepton_trainer.launch"], [*program, "--lr", "-m", "x"])
    assert rc_t == rc_l == 0, err
    assert set(ours) == set(torchrun) == {"rank0-restart0", "rank1-restart0"}
    for key in ours:
        assert ours[key]["argv"] == torchrun[key]["argv"] == ["--lr", "-m", "x"]
        assert ours[key]["name"] == torchrun[key]["name"] == "__main__"
        assert {k: v for k, v in ours[key]["env"].items() if k != "MASTER_ADDR"} == \
            {k: v for k, v in torchrun[key]["env"].items() if k != "MASTER_ADDR"}
        assert ours[key]["warm"] and not torchrun[key]["warm"]
    # Both workers come from one forkserver, not from the agent.
    assert ours["rank0-restart0"]["ppid"] == ours["rank1-restart0"]["ppid"]


def test_a_failed_worker_is_restarted_from_the_same_forkserver_and_the_status_is_torchruns(tmp_path, script):
    rc, seen, err = run(tmp_path, ["lepton_trainer.launch"], [str(script)], nproc=1, restarts=1, exit_code=3)
    assert rc == 0, err                                   # exit 3, then a restart that succeeds
    assert set(seen) == {"rank0-restart0", "rank0-restart1"}
    assert seen["rank0-restart0"]["ppid"] == seen["rank0-restart1"]["ppid"]
    assert seen["rank0-restart0"]["pid"] != seen["rank0-restart1"]["pid"]
    again = tmp_path / "again"
    again.mkdir()
    rc, seen, err = run(again, ["lepton_trainer.launch"], [str(script)], nproc=1, restarts=0, exit_code=3)
    assert rc != 0 and "exitcode  : 3" in err and set(seen) == {"rank0-restart0"}


def test_standalone_runs_as_with_torchrun(tmp_path, script):
    out = tmp_path / "standalone"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "lepton_trainer.launch", "--standalone", "--nproc-per-node=2",
                           str(script), "x"], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(out), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    seen = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(seen) == {"rank0-restart0", "rank1-restart0"} and seen["rank1-restart0"]["env"]["WORLD_SIZE"] == "2"


def test_what_the_launcher_refuses_and_preloads(tmp_path, script):
    done = subprocess.run([sys.executable, "-m", "lepton_trainer.launch", "--no-python", "--nnodes=1",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "/bin/true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "use torchrun itself for --no-python" in done.stderr
    builtin = launch.preload_modules("lepton_trainer.train", True, "numpy, ,json")
    assert builtin[:4] == list(launch.PRELOAD) and "sklearn.datasets" in builtin and builtin[-2:] == ["numpy", "json"]
    assert "lepton_trainer.train" not in builtin          # runpy runs the program itself afresh
    assert launch.preload_modules("train.py", False) == list(launch.PRELOAD)
    assert launch.preload_modules("lepton_trainer.train", False) == list(launch.PRELOAD)   # a script path
