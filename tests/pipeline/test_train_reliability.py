"""Training reliability on real Ray workers: a SIGKILLed run resumes, a dead worker is restarted (PLATFORM §5).

Both tests run ``python -m stages.train`` as a subprocess with 2 Ray Train workers (DDP over gloo) on the tiny store of
tests/stages/test_train.py (16 train images, 4 per batch: 2 steps per epoch and rank; 8 val images), 2 epochs, and
compare with one uninterrupted run of the same config (module fixture ``reference``). Failures are injected with the
``SETEMB_TEST_FAIL_AT`` hook of ``pipeline/ray_train.py`` (module docstring), which fires once per run.

Tolerance: ``TOL = 1e-4`` (absolute) on the train loss and val RSUM of every epoch. Resuming is deterministic by
design (the checkpoint holds model, loss, optimizer, scheduler and scaler state; the sampler and the torch RNG are
seeded by (seed, epoch, rank)), so in practice the numbers agree to the last bit; the tolerance only absorbs a
different float summation order, never a different trajectory (one extra or missing optimizer step moves the
loss by far more than 1e-4).

Every subprocess runs in its own session; a test kills that whole process group when it fails or times out and
waits until every process of it (driver, GCS, raylet, dashboard, Ray workers) is gone, so no Ray is left running.
``ray stop --force`` is never used: it would also stop the Ray clusters of other tests on this shared machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.ray_train import FAIL_AT_ENV, FAIL_AT_MARKER
from tests.stages.test_train import tiny_params_dict, write_store

TOL = 1e-4
EPOCHS = 2
RUN_TIMEOUT_S = 150
COMPARED = ("train_loss", "train_triplet", "val_rsum", "val_i2t_r1", "val_t2i_r1", "lr")


# ------------------------------------------------------------------------------------------------- processes
def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, process group, state) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _tree(root: int) -> set[int]:
    """Living (non-zombie) processes of ``root``'s process group and descendants of ``root`` (Ray workers are
    children of the raylet, each in a process group of its own)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, pgrp, _) in table.items() if pgrp == root}
    seen, frontier = {root}, [root, *found]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in seen:
                seen.add(child)
                frontier.append(child)
    return {pid for pid in seen | found if pid in table and table[pid][2] != "Z"}


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {pid for pid in pids if pid in table and table[pid][2] != "Z"}


def kill_tree(
    proc: subprocess.Popen, wait_s: float = 30.0, kill: bool = True, also: set[int] = frozenset()
) -> set[int]:
    """SIGKILL ``proc``'s process group (unless ``kill=False``); wait until it and the pids ``also`` are gone.

    Returns:
        The pids still alive after ``wait_s`` (then killed one by one, by id; the caller fails the test).
    """
    pids = _tree(proc.pid) | set(also)
    if kill:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + wait_s
    while True:
        left = _alive(pids | _tree(proc.pid))
        if not left:
            return set()
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in left:  # processes this test started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def start_stage(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_stage(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run the stage to its end (killing its whole process group on timeout); (exit code, combined output)."""
    proc = start_stage(cmd, cwd, env, log)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"{' '.join(cmd)} ran past {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    except BaseException:
        kill_tree(proc)
        raise
    left = kill_tree(proc, kill=False)  # the driver exited; Ray's daemons must follow it by themselves
    assert not left, f"Ray processes left behind by a finished run: {sorted(left)}"
    return code, log.read_text()


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("features") / "features.zarr")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAIL_AT_ENV)}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", **extra)
    return env


def setup_run(workdir: Path, store: Path, max_failures: int = 0) -> list[str]:
    """params.yaml (2 Ray workers, ``EPOCHS`` epochs) in ``workdir``; returns the stage command (run in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = tiny_params_dict(
        optim={"lr": 0.003, "epochs": EPOCHS, "warmup_epochs": 0.5, "amp": False},
        ray={"num_workers": 2, "max_failures": max_failures},
    )
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", "params.yaml", "--features", str(store), "--storage", "training", "--out", "model"]
    return [sys.executable, "-m", "stages.train", *args, "--live", "dvclive"]


def run_dir_of(workdir: Path) -> Path:
    runs = sorted((workdir / "training").glob("train-*"))
    assert len(runs) == 1, runs
    return runs[0]


def read_history(workdir: Path) -> list[dict]:
    return json.loads((run_dir_of(workdir) / "history.json").read_text())


def assert_same_metrics(history: list[dict], reference: list[dict]) -> None:
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    for got, want in zip(history, reference, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], abs=TOL), (got["epoch"], key)


def assert_same_model(workdir: Path, reference: Path) -> None:
    """The exported best model: same epoch and val RSUM, weights equal within ``TOL``."""
    got, want = workdir / "model", reference / "model"
    got_config, want_config = (json.loads((d / "config.json").read_text()) for d in (got, want))
    assert got_config["epoch"] == want_config["epoch"]
    assert got_config["val_rsum"] == pytest.approx(want_config["val_rsum"], abs=TOL)
    got_state, want_state = (torch.load(d / "model.pt", weights_only=True) for d in (got, want))
    assert got_state.keys() == want_state.keys()
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], atol=TOL, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """One uninterrupted 2-worker run (about 40 s): the numbers the interrupted runs must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    code, output = run_stage(setup_run(workdir, store), workdir, base_env(), workdir / "stage.log")
    assert code == 0, output[-4000:]
    assert [h["epoch"] for h in read_history(workdir)] == list(range(EPOCHS))
    return workdir


def fired(run_dir: Path) -> str | None:
    """The hook's marker text once it is completely written (``"<spec> pid=<worker pid>"``), else None."""
    try:
        text = (run_dir / FAIL_AT_MARKER).read_text()
    except OSError:
        return None
    return text if text.endswith("\n") else None


def latest_checkpoint_epoch(run_dir: Path) -> int | None:
    """Epoch of the latest checkpoint Ray has registered (``checkpoint_manager_snapshot.json``), None before one."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet
        return None
    if not latest or not (run_dir / latest["checkpoint_dir_name"]).is_dir():
        return None
    return int(latest["metrics"]["epoch"])


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.ray
def test_sigkilled_run_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, store: Path, reference: Path) -> None:
    """SIGKILL the whole stage (driver and Ray) in the middle of epoch 1, then rerun the same command.

    ``SETEMB_TEST_FAIL_AT=1:1:0:hang`` parks rank 0 before step 1 of epoch 1 (rank 1 waits in the all-reduce), so
    the kill lands at a known point after the epoch-0 checkpoint (the epochs of this tiny run take 0.1 s; without the
    hook the run would finish before a poll could see the checkpoint). The test waits until Ray's checkpoint
    snapshot names the epoch-0 checkpoint, kills the process group, checks that no process of it survives, and
    reruns the identical command (same env: the hook's marker file keeps it off). The rerun must say it resumed,
    keep the epoch-0 history entry byte-for-byte (epoch 0 was not retrained; ``epoch_time_s`` would differ), train
    only epoch 1, and end with the reference run's metrics (``TOL`` = 1e-4 absolute on train loss, val RSUM,
    R@1 and lr of every epoch) and the same exported best model.
    """
    cmd = setup_run(tmp_path, store)
    env = base_env(**{FAIL_AT_ENV: "1:1:0:hang"})
    proc = start_stage(cmd, tmp_path, env, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            runs = list((tmp_path / "training").glob("train-*"))
            if runs and fired(runs[0]) and latest_checkpoint_epoch(runs[0]) == 0:
                break
            assert proc.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'killed.log').read_text()}"
            assert time.monotonic() < deadline, "no epoch-0 checkpoint in time"
            time.sleep(0.5)
        tree = _tree(proc.pid)
        assert len(tree) >= 4, f"expected the driver plus Ray daemons and workers, got {sorted(tree)}"
    finally:
        left = kill_tree(proc)
    assert not left, f"processes survived the SIGKILL of the process group: {sorted(left)}"
    assert proc.returncode == -signal.SIGKILL
    run_dir = run_dir_of(tmp_path)
    before = read_history(tmp_path)
    assert [h["epoch"] for h in before] == [0]
    assert (run_dir / FAIL_AT_MARKER).read_text().startswith("1:1:0:hang")

    code, output = run_stage(cmd, tmp_path, env, tmp_path / "resumed.log")
    assert code == 0, output[-4000:]
    assert f"trained {EPOCHS} epochs ({run_dir.name}, resumed)" in output
    assert "(resuming)" in output and "resuming at epoch 1" in output
    assert f"epoch 1/{EPOCHS}: " not in output and f"epoch 2/{EPOCHS}: " in output  # it trained epoch 1 only
    after = read_history(tmp_path)
    assert after[0] == before[0]
    assert_same_metrics(after, read_history(reference))
    assert_same_model(tmp_path, reference)
    live = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert live["step"] == EPOCHS - 1 and live["train_loss"] == pytest.approx(after[-1]["train_loss"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_worker_death_mid_epoch_is_restarted_and_matches_an_uninterrupted_run(
    how: str, tmp_path: Path, store: Path, reference: Path
) -> None:
    """Rank 1 dies in the middle of epoch 1; with ``max_failures: 2`` Ray restarts the worker group and finishes.

    Rank 1 has already taken step 0 of epoch 1 when it dies before step 1, so the restarted group must throw away
    that partial epoch. Two ways to die:

    - ``exit``: ``SETEMB_TEST_FAIL_AT=1:1:1`` makes rank 1 call ``os._exit(1)`` there. The restarted group starts
      from the latest checkpoint Ray has *registered*, and Ray's controller collects the workers' reports only
      every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``) while an epoch of this run takes 0.1 s, so the epoch-0
      report is usually lost with the dead worker and the new group retrains from epoch 0 (seen in practice); it
      may also resume at epoch 1. Both are correct, and both must end with the reference run's numbers, because
      every epoch is seeded by (seed, epoch, rank) and a fresh start replays the same trajectory.
    - ``sigkill``: ``SETEMB_TEST_FAIL_AT=1:1:1:hang`` parks rank 1 there; the test waits until Ray has registered
      the epoch-0 checkpoint, then SIGKILLs that worker process (as the OOM killer would). Now the restart point is
      known: the new group must resume at epoch 1 from the epoch-0 checkpoint (``ray.train.get_checkpoint()``) and
      must not retrain epoch 0.

    Either way: the run exits 0 with both epochs; the hook's marker file and Ray's ``[FailurePolicy] RETRY`` line
    plus a second "Started training worker group" show that the failure and the restart happened; the history
    (``TOL`` = 1e-4 absolute, module docstring) and the exported best model equal the reference run's
    (``max_failures`` is not in the run fingerprint, so the run even has the same name); no process is left.
    """
    # --debug: the failure and Ray's restart are read from the workers' and Ray's own log lines, which reach the
    # driver's console only in debug mode
    cmd = [*setup_run(tmp_path, store, max_failures=2), "--debug"]
    spec = "1:1:1" if how == "exit" else "1:1:1:hang"
    log = tmp_path / "stage.log"
    if how == "exit":
        code, output = run_stage(cmd, tmp_path, base_env(**{FAIL_AT_ENV: spec}), log)
    else:
        proc = start_stage(cmd, tmp_path, base_env(**{FAIL_AT_ENV: spec}), log)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                runs = list((tmp_path / "training").glob("train-*"))
                if runs and fired(runs[0]) and latest_checkpoint_epoch(runs[0]) == 0:
                    break
                assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no epoch-0 checkpoint in time"
                time.sleep(0.5)
            worker = int(fired(runs[0]).split("pid=")[1])
            assert worker in _tree(proc.pid), "the parked worker is not a process of this run"
            os.kill(worker, signal.SIGKILL)
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            left = kill_tree(proc, kill=proc.poll() is None)
        assert not left, f"Ray processes left behind by a finished run: {sorted(left)}"
        output = log.read_text()
    assert code == 0, output[-4000:]
    run_dir = run_dir_of(tmp_path)
    assert run_dir.name == run_dir_of(reference).name
    assert (run_dir / FAIL_AT_MARKER).read_text().startswith(f"{spec} pid=")
    assert f"{FAIL_AT_ENV}={spec}: {how if how == 'exit' else 'hang'} at epoch 1 step 1 rank 1" in output
    assert "[FailurePolicy] RETRY" in output and output.count("Started training worker group of size 2") == 2
    assert f"trained {EPOCHS} epochs ({run_dir.name})" in output
    if how == "sigkill":
        # epoch 0 was summarised once (the driver's line "epoch 1/2: ..."): the restarted group did not retrain it
        assert "resuming at epoch 1" in output and output.count(f"epoch 1/{EPOCHS}: ") == 1
    history = read_history(tmp_path)
    assert_same_metrics(history, read_history(reference))
    assert_same_model(tmp_path, reference)
    assert latest_checkpoint_epoch(run_dir) == EPOCHS - 1
