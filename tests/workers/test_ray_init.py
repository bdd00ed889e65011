"""Joining or starting Ray: a stale address file cannot break a run, a silent address is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from qerl_rollout.layout import LayoutError
from qerl_rollout.placement.ray import init_ray

ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")   # what `ray start --head` writes


@pytest.fixture
def no_ray(monkeypatch):
    """No Ray in this process, no RAY_ADDRESS, and the address file restored afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = ADDRESS_FILE.read_bytes() if ADDRESS_FILE.exists() else None
    yield
    if ray.is_initialized():
        ray.shutdown()
    if before is None:
        ADDRESS_FILE.unlink(missing_ok=True)
    else:
        ADDRESS_FILE.write_bytes(before)


def test_a_stale_address_file_does_not_stop_a_local_cluster(no_ray):
    """Measured before the fix: with this file left by a killed head, `ray.init(num_cpus=...)`
    failed: "When connecting to an existing cluster, num_cpus and num_gpus must not be provided"."""
    ADDRESS_FILE.parent.mkdir(parents=True, exist_ok=True)
    ADDRESS_FILE.write_text("127.0.0.1:1")              # nothing listens there
    init_ray("", local_cpus=3)
    assert ray.cluster_resources()["CPU"] == 3


def test_no_cluster_at_the_address_is_one_line(no_ray):
    ADDRESS_FILE.unlink(missing_ok=True)
    with pytest.raises(LayoutError, match="no Ray cluster answers at 'auto'"):
        init_ray("auto", local_cpus=1)
