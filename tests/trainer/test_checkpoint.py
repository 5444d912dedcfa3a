"""Checkpoint files: atomic write, keep-last-K, newest valid one on load."""
import logging

import pytest
import torch

from lepton_trainer.checkpoint import CheckpointManager

pytestmark = pytest.mark.trainer


def _state(step):
    return {"weights": torch.full((4,), float(step))}


def test_keeps_last_k_and_leaves_no_temp_files(tmp_path):
    ckpts = CheckpointManager(tmp_path, every=10, keep=2)
    for step in (10, 20, 30):
        ckpts.save(step, _state(step))
    assert ckpts.steps() == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000020.pt", "ckpt-0000000030.pt"]
    latest = ckpts.load_latest()
    assert latest["step"] == 30 and torch.equal(latest["weights"], torch.full((4,), 30.0))


def test_interval_is_counted_in_steps():
    ckpts = CheckpointManager("unused", every=25)
    assert [s for s in range(0, 101) if ckpts.due(s)] == [25, 50, 75, 100]
    assert not any(CheckpointManager("unused", every=0).due(s) for s in range(100))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_step"])
def test_invalid_newest_falls_back_to_previous(tmp_path, caplog, damage):
    ckpts = CheckpointManager(tmp_path, keep=3)
    for step in (100, 200):
        ckpts.save(step, _state(step))
    newest = ckpts.path_for(200)
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garbage":
        newest.write_bytes(b"not a checkpoint" * 50)
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        torch.save({"step": 150, **_state(150)}, newest)
    with caplog.at_level(logging.WARNING, logger="lepton_trainer.checkpoint"):
        state = ckpts.load_latest()
    assert state["step"] == 100
    assert torch.equal(state["weights"], torch.full((4,), 100.0))
    assert any("skipping invalid checkpoint" in r.message and newest.name in r.message
               for r in caplog.records)


def test_partial_write_is_invisible_and_cleaned_up(tmp_path):
    ckpts = CheckpointManager(tmp_path)
    ckpts.save(5, _state(5))
    (tmp_path / ".ckpt-0000000010.pt.tmp").write_bytes(b"half written")  # a writer died here
    assert ckpts.steps() == [5] and ckpts.load_latest()["step"] == 5
    ckpts.save(10, _state(10))
    assert not list(tmp_path.glob(".*.tmp"))


def test_empty_or_missing_directory_gives_none(tmp_path):
    assert CheckpointManager(tmp_path / "absent").load_latest() is None
    assert CheckpointManager(tmp_path).load_latest() is None


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="every"):
        CheckpointManager(tmp_path, every=-1)


def test_a_background_save_writes_the_state_as_it_was_when_called(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    weights = torch.zeros(1000)
    state = {"model": {"w": weights}, "optimizer": {"state": {0: {"exp_avg": weights * 2}}, "groups": [1, 2]}}
    seen = []
    m.save_async(5, state, seen.append)
    weights += 1                                   # the next optimizer step, while the file is written
    path = m.wait()
    assert seen == [path] and path == m.path_for(5) and path.exists()
    loaded = m.load_latest()
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], torch.zeros(1000))
    assert loaded["optimizer"]["groups"] == [1, 2] and isinstance(loaded["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert m.wait() is None                        # nothing in flight
    # One write in flight at most: each call waits for the one before; pruning still keeps 2.
    for step in (10, 15, 20):
        m.save_async(step, {"model": {"w": weights}})
    m.wait()
    assert m.steps() == [15, 20] and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_background_save_raises_at_the_next_wait(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    m = CheckpointManager(blocked)
    m.save_async(1, {"x": torch.ones(2)})
    with pytest.raises((FileExistsError, NotADirectoryError)):
        m.wait()
