"""Fine-tune checkpoints are trusted as data only (issue 10): a crafted last.pt runs no code, an
unreadable one is set aside and the run retrains, a format-1 checkpoint still resumes, a full
disk leaves the last checkpoint whole, and two processes asking for one run train it once.
Resume on CUDA (issue 15): one GPU's RNG state, restored wherever fewer GPUs are visible, and a
deterministic mode whose killed-and-resumed run ends with the same bits (tests marked gpu).

Real tiny `test_resnet` runs on the synthetic 28 px BreastMNIST, real subprocesses, a real
file-size limit; nothing mocked.

Run: .venv/bin/python -m pytest tests/test_checkpoints.py -q
"""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import shutil
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from medfm.errors import InvalidArgumentError, MedfmWarning
from medfm.finetune import finetune, finetune_job
from medfm.resolve.finetune import resolve_finetune
from medfm.resolve.recipes import resolve_recipe
from medfm.finetune.run import BEST_WEIGHTS_NAME, LOCK_NAME, checkpoint_folder
from medfm.finetune.train import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    UNREADABLE_SUFFIX,
    cuda_rng_state,
)
from medfm.runtime import deterministic_algorithms
from medfm.sampling import SubsetSpec
from medfm.store.registry import Registry

FAST = dict(epochs=2, batch_size=16, resize_policy="native", augment=True)  # 4 steps an epoch
STEPS = 8  # 48 training images in batches of 12 (medfm: at least 4 steps an epoch) x 2 epochs
FILE_LIMIT = 1 << 20  # bytes: above what a run writes elsewhere, below a test_resnet checkpoint


def _request(root, seed: int = 0):
    return resolve_finetune(dataset="breastmnist", size=28, backbone="test_resnet",
                            weights="random", spec=SubsetSpec(fraction=1.0, seed=seed),
                            recipe=resolve_recipe("medfm", **FAST), data_root=root)


def _job(root, workdir, on_checkpoint=None, device="cpu", deterministic=False):
    """(row, test scores, set-aside warnings) of one fine-tune job."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row, scores, _ = finetune_job(_request(root), device=device, workdir=workdir,
                                      progress=False, on_checkpoint=on_checkpoint,
                                      deterministic=deterministic)
    notices = [str(w.message) for w in caught
               if issubclass(w.category, MedfmWarning) and "set aside" in str(w.message)]
    return row, scores, notices


def _killed_after_first_round(root, workdir, **job):
    """The checkpoint a run leaves when it dies right after its first round."""
    def die(round_: int) -> None:
        if round_ == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _job(root, workdir, on_checkpoint=die, **job)
    return checkpoint_folder(workdir, _request(root).key()) / CHECKPOINT_NAME


def _cli(root, workdir) -> list[str]:
    return [sys.executable, "-m", "medfm", "finetune", "--dataset", "breastmnist", "--size", "28",
            "--backbone", "test_resnet", "--weights", "random", "--device", "cpu",
            "--epochs", "2", "--batch-size", "16", "--resize-policy", "native",
            "--data-root", str(root), "--workdir", str(workdir), "--quiet"]


class _Shell:
    """Pickles as a call of os.system: what a crafted checkpoint would make torch.load run."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_crafted_checkpoint_runs_no_code_and_is_set_aside(synthetic_root, tmp_path):
    folder = checkpoint_folder(tmp_path, _request(synthetic_root).key())
    folder.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"plan": {"format": CHECKPOINT_FORMAT}, "model": _Shell(f"touch {marker}")},
               folder / CHECKPOINT_NAME)
    torch.load(folder / CHECKPOINT_NAME, weights_only=False)  # the file is a real exploit
    assert marker.exists()
    marker.unlink()

    row, _, notices = _job(synthetic_root, tmp_path)
    assert not marker.exists()
    assert len(notices) == 1 and "\n" not in notices[0]
    assert f"set aside as {CHECKPOINT_NAME}{UNREADABLE_SUFFIX}" in notices[0]
    assert (folder / f"{CHECKPOINT_NAME}{UNREADABLE_SUFFIX}").is_file()  # kept, not deleted
    assert not row.extra["resumed"] and row.extra["steps"] == STEPS  # trained from scratch


def test_a_checkpoint_copied_from_another_run_is_set_aside(synthetic_root, tmp_path):
    """Seed 1's checkpoint has the plan of seed 0's run (same data, batches and steps): copied
    into seed 0's folder it would resume as seed 0; the run it names says it is not."""
    other = _request(synthetic_root, seed=1)

    def die(round_: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_job(other, device="cpu", workdir=tmp_path, progress=False, on_checkpoint=die)
    folder = checkpoint_folder(tmp_path, _request(synthetic_root).key())
    folder.mkdir(parents=True)
    shutil.copy2(checkpoint_folder(tmp_path, other.key()) / CHECKPOINT_NAME,
                 folder / CHECKPOINT_NAME)

    row, _, notices = _job(synthetic_root, tmp_path)
    assert len(notices) == 1 and f"holds run {other.key().digest()}" in notices[0], notices
    assert not row.extra["resumed"] and row.extra["steps"] == STEPS  # trained from scratch


@pytest.mark.parametrize("damage, why", [
    ("truncated", "cannot be read as tensors and plain data"),
    ("garbage", "cannot be read as tensors and plain data"),
    ("foreign", "is not a medfm checkpoint"),  # loads, but holds other things
])
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_retrains(synthetic_root, tmp_path,
                                                                     damage, why):
    last = _killed_after_first_round(synthetic_root, tmp_path)
    data = last.read_bytes()
    if damage == "foreign":
        torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}}, last)
    else:
        last.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(4096))

    row, _, notices = _job(synthetic_root, tmp_path)
    assert len(notices) == 1 and why in notices[0]
    assert last.with_name(last.name + UNREADABLE_SUFFIX).is_file()
    assert not row.extra["resumed"] and row.extra["steps"] == STEPS
    assert [c["round"] for c in row.extra["curves"]] == [1, 2]


def test_checkpoints_hold_plain_data_and_a_format_1_checkpoint_resumes(synthetic_root,
                                                                       tmp_path):
    whole, whole_scores, _ = _job(synthetic_root, tmp_path / "whole")
    last = _killed_after_first_round(synthetic_root, tmp_path / "old")
    saved = torch.load(last, weights_only=True)  # tensors and plain types: no globals allowed
    assert saved["plan"]["format"] == CHECKPOINT_FORMAT == 2

    # rewrite it as format 1 wrote it: numpy's RNG state as a pickled uint32 array
    kind, key, *rest = saved["rng"]["numpy"]
    saved["rng"]["numpy"] = (kind, key.numpy().astype(np.uint32), *rest)
    saved["plan"]["format"] = 1
    torch.save(saved, last)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(last)

    torch.manual_seed(123)  # the resumed process starts with other RNG states
    np.random.seed(123)
    row, scores, notices = _job(synthetic_root, tmp_path / "old")
    assert notices == []
    assert row.extra["resumed"] and row.extra["steps"] == STEPS
    assert row.extra["curves"][0]["seconds"] == saved["state"]["curves"][0]["seconds"]  # kept
    assert np.array_equal(scores, whole_scores) and (row.acc, row.auc) == (whole.acc, whole.auc)


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temp(synthetic_root,
                                                                      tmp_path):
    """A real `medfm finetune` under a 1 MiB file-size limit (writes fail with EFBIG: Python
    ignores SIGXFSZ); then a stale temp file of a killed writer goes when the run reruns."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    full = subprocess.run(_cli(synthetic_root, tmp_path), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert full.returncode == 2, full.stderr
    errors = [line for line in full.stderr.splitlines() if "error" in line]
    assert errors == [f"medfm finetune: error: disk full writing "
                      f"{checkpoint_folder(tmp_path, _request(synthetic_root).key())}/"
                      f"{CHECKPOINT_NAME}: free space and rerun; training resumes from the last "
                      f"checkpoint"], full.stderr
    assert "Traceback" not in full.stderr
    folder = checkpoint_folder(tmp_path, _request(synthetic_root).key())
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # no temp, no half file

    stale = folder / f".{CHECKPOINT_NAME}.999999.tmp"  # left by a writer killed mid-write
    stale.write_bytes(b"half a checkpoint")
    report = finetune(datasets=["breastmnist"], backbones=["test_resnet"], sizes=[28],
                      overrides=FAST, weights="random", device="cpu", workdir=tmp_path,
                      data_root=synthetic_root, progress=False)
    assert len(report.ran) == 1
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, BEST_WEIGHTS_NAME]


def _wait_for_line(stream, words: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            line = stream.readline()
            if words in line:
                return line
    raise AssertionError(f"no line with {words!r} within {timeout} s")


def test_two_processes_asking_for_one_run_train_it_once(synthetic_root, tmp_path):
    """Process A holds the run's lock (stopped right after taking it, so B surely finds it
    held); B says once that it waits for A, then finds the run recorded and reuses it."""
    folder = checkpoint_folder(tmp_path, _request(synthetic_root).key())
    started = []

    def start() -> subprocess.Popen:
        started.append(subprocess.Popen(_cli(synthetic_root, tmp_path), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
        return started[-1]

    try:
        first = start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            lock = folder / LOCK_NAME
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.01)
        assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGSTOP)  # holding the lock
        second = start()
        waiting = _wait_for_line(second.stderr, "waiting for", timeout=120)
        assert waiting.strip() == (f"waiting for pid {first.pid}, which is training "
                                   f"{_request(synthetic_root).label}")
        first.send_signal(signal.SIGCONT)
        out_first, err_first = first.communicate(timeout=300)
        out_second, err_second = second.communicate(timeout=300)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    assert first.returncode == 0 and second.returncode == 0, (err_first, err_second)
    assert "1 run(s) trained, 0 already in the registry" in out_first
    assert "0 run(s) trained, 1 already in the registry" in out_second
    assert "waiting" not in err_second  # the one line, read above
    assert len(Registry.in_workdir(tmp_path)) == 1
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, BEST_WEIGHTS_NAME]


def test_a_job_finds_its_run_recorded_once_it_holds_the_lock(synthetic_root, tmp_path,
                                                            monkeypatch):
    """What a grid worker does when another process recorded its run after the grid was
    planned: return the recorded row and scores, load no model."""
    report = finetune(datasets=["breastmnist"], backbones=["test_resnet"], sizes=[28],
                      overrides=FAST, weights="random", device="cpu", workdir=tmp_path,
                      data_root=synthetic_root, progress=False)
    (recorded,) = report.ran

    def refuse(*args, **kwargs):
        raise AssertionError("a recorded run must not load a model")

    monkeypatch.setattr("medfm.finetune.run.create_backbone", refuse)
    row, scores, y_true = finetune_job(_request(synthetic_root), device="cpu",
                                       workdir=tmp_path, progress=False)
    assert row.key == recorded.key and row.acc == recorded.acc
    assert scores.shape == (len(y_true), 2)


def test_the_resuming_gpu_gets_one_saved_cuda_state_whatever_was_visible_before():
    """Checkpoints hold the training GPU's generator state; older ones hold every visible GPU's.
    A run resumed on GPU `index` takes its own, or the first (a pinned worker's) where fewer GPUs
    are visible now, never one per saved GPU (which raised IndexError)."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # 4 GPUs when saved
    assert torch.equal(cuda_rng_state(states, 2), states[2])
    assert torch.equal(cuda_rng_state(states[:1], 3), states[0])  # fewer visible when saved
    assert torch.equal(cuda_rng_state(states[3], 0), states[3])  # the training GPU's, as saved
    assert cuda_rng_state(None, 0) is None and cuda_rng_state([], 0) is None  # a CPU checkpoint


def test_a_deterministic_run_resumes_to_the_same_result_and_leaves_torch_as_it_was(
        synthetic_root, tmp_path):
    whole, whole_scores, _ = _job(synthetic_root, tmp_path / "whole", deterministic=True)
    assert whole.extra["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # put back after the run
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    _killed_after_first_round(synthetic_root, tmp_path / "killed", deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()  # put back on the way out too
    row, scores, _ = _job(synthetic_root, tmp_path / "killed", deterministic=True)
    assert row.extra["resumed"] and np.array_equal(scores, whole_scores)
    plain, plain_scores, _ = _job(synthetic_root, tmp_path / "plain")  # CPU: same bits anyway
    assert plain.extra["deterministic"] is False and np.array_equal(plain_scores, whole_scores)


def test_an_op_without_a_deterministic_kernel_is_a_one_line_error():
    from torch._prims_common import alert_not_deterministic  # what such an op calls

    with pytest.raises(InvalidArgumentError, match="^deterministic run asked for, but "
                       "grid_sampler_2d_backward_cuda has no deterministic implementation on "
                       "this device; run without --deterministic.$"):
        with deterministic_algorithms():
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            alert_not_deterministic("grid_sampler_2d_backward_cuda")
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


@pytest.mark.gpu
def test_a_cuda_checkpoint_of_more_gpus_than_are_visible_resumes(synthetic_root, tmp_path):
    last = _killed_after_first_round(synthetic_root, tmp_path, device="cuda")
    saved = torch.load(last, weights_only=True)
    assert isinstance(saved["rng"]["cuda"], torch.Tensor)  # the training GPU's state only
    visible = torch.cuda.device_count()
    saved["rng"]["cuda"] = [saved["rng"]["cuda"]] * (visible + 3)  # as get_rng_state_all wrote
    torch.save(saved, last)
    row, _, notices = _job(synthetic_root, tmp_path, device="cuda")
    assert notices == [] and row.extra["resumed"]


@pytest.mark.gpu
def test_a_deterministic_cuda_run_killed_and_resumed_ends_with_the_same_bits(synthetic_root,
                                                                              tmp_path):
    whole, whole_scores, _ = _job(synthetic_root, tmp_path / "whole", device="cuda",
                                  deterministic=True)
    _killed_after_first_round(synthetic_root, tmp_path / "killed", device="cuda",
                              deterministic=True)
    row, scores, _ = _job(synthetic_root, tmp_path / "killed", device="cuda", deterministic=True)
    assert row.extra["resumed"] and row.device == "cuda"
    assert np.array_equal(scores, whole_scores) and (row.acc, row.auc) == (whole.acc, whole.auc)
