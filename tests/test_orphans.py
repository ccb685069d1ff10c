"""Issue 10: local-executor workers end when their `medfm grid` driver is SIGKILLed, and a rerun
picks up what they left (a real driver process, real spawned workers, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medfm.store.registry import Registry
from medfm.synthetic import write_synthetic_npz

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _children(pid: int) -> set[int]:
    """Live processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_sigkilled_driver_takes_its_workers_and_the_rerun_finishes(tmp_path):
    root = tmp_path / "data"
    write_synthetic_npz(root, "breastmnist", size=28, n=(32, 12, 16))
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({
        "datasets": ["breastmnist"], "sizes": [28], "backbones": ["test_resnet"],
        "weights": "random", "fractions": [1.0], "seeds": [0], "methods": ["finetune"],
        "resize_policy": "native", "device": "cpu", "data_root": str(root),
        "finetune": {"recipe": "medfm", "overrides": {"epochs": 300, "batch_size": 16,
                                                      "augment": False}}}))
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "medfm", "grid", str(spec), "--workdir", str(workdir),
           "--max-workers", "2", "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None:
        if checkpoints.exists() and list(checkpoints.glob("*/last.pt")):
            break  # a worker is training and has checkpointed
        time.sleep(0.1)
    assert driver.poll() is None, driver.stderr.read().decode()
    workers = _children(driver.pid)
    assert len(workers) >= 2  # the pool's workers (and multiprocessing's resource tracker)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # do not leave them running if the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == []

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    registry = Registry.in_workdir(workdir)
    rows = registry.query()
    registry.close()
    assert len(rows) == 1 and rows[0].extra["resumed"] is True


def test_gpu_pinning_follows_the_drivers_visible_devices():
    """Issue 15.5: workers are pinned to the GPUs the driver sees, as it names them."""
    from medfm.grid.executors.local import gpu_assignments

    assert gpu_assignments(2, 2, "2,3") == ["2", "3"]
    assert gpu_assignments(3, 2, "2,3") == ["2", "3", "2"]
    assert gpu_assignments(2, 2, None) == ["0", "1"]
    assert gpu_assignments(2, 2, "") == ["0", "1"]
    assert gpu_assignments(1, 1, "GPU-5f1c,GPU-77aa") == ["GPU-5f1c"]
