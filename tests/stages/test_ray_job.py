"""The train stage submitted to a real (loopback) Ray cluster with ``ray job submit`` (PLATFORM §5).

The head runs as ``ray start --head --block`` in its own session, so that the test can stop exactly this cluster
(SIGTERM to that process, which shuts down the daemons it started; then SIGKILL of whatever of its process tree is
left) without ``ray stop --force``, which would also stop the Ray clusters of other tests on this shared machine.
``--temp-dir`` keeps its session files and its address file out of ``/tmp/ray``, so a concurrent ``ray.init()``
elsewhere never attaches to it, and every port it opens is a free one chosen here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.checkpoints import load_model
from tests.pipeline.test_train_reliability import _tree, kill_tree
from tests.stages.test_train import tiny_params_dict, write_store

VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 150


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on this machine right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def client_env() -> dict[str, str]:
    """The venv first on PATH (the job's ``python`` resolves through the head's PATH), no auth, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SETEMB_TEST_FAIL_AT")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
    )
    return env


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A 2-CPU Ray head on loopback with the dashboard (job server); yields its ``http://127.0.0.1:<port>``.

    Always stopped at teardown, and the test fails if any process of it survives.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env, client, node_manager, object_manager = free_ports(9)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log = temp_dir / "ray_start.log"
    with log.open("wb") as out:
        env = {**client_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # SIGTERM: stop at once, no drain
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no Ray dashboard at {address}:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield address
    finally:
        tree = _tree(head.pid)
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        left = kill_tree(head, also=tree)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes survived the teardown of the test cluster: {sorted(left)}"


@pytest.mark.slow
@pytest.mark.ray
def test_train_stage_runs_as_a_ray_job_on_a_loopback_cluster(tmp_path: Path, ray_head: str) -> None:
    """``ray job submit`` of the train stage to a local head; the job succeeds and leaves checkpoint and model.

    The command (the README shows the same), with ``RAY_AUTH_MODE=disabled`` exported for ``ray start`` and for the
    client, and the venv's bin first on PATH when the head starts (the job's ``python`` is found through it; the
    project is pip-installed editable there, so ``python -m stages.train`` works from the job's working dir)::

        ray job submit --address http://127.0.0.1:<dashboard port> --submission-id <id> --working-dir <jobdir> \\
            -- python -m stages.train --params params.yaml --features <abs features.zarr> \\
               --storage <abs training> --out <abs model> --live <abs dvclive> --workers 2 --epochs 1 --quiet

    ``<jobdir>`` holds only params.yaml (``--working-dir`` uploads it, and the job runs inside the uploaded copy,
    hence the relative ``--params`` and the absolute data paths). Inside the job ``stages.train`` attaches to the
    cluster through ``RAY_ADDRESS``, which Ray sets for the job.
    """
    features = write_store(tmp_path / "features.zarr")
    jobdir = tmp_path / "jobdir"
    jobdir.mkdir()
    (jobdir / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))  # num_workers 0; --workers 2 overrides
    storage, out, live = tmp_path / "training", tmp_path / "model", tmp_path / "dvclive"
    submission_id = f"setemb-train-{os.getpid()}-{time.monotonic_ns()}"
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--submission-id", submission_id]
    stage = ["python", "-m", "stages.train", "--params", "params.yaml", "--features", str(features)]
    stage += ["--storage", str(storage), "--out", str(out), "--live", str(live), "--workers", "2", "--epochs", "1"]
    result = subprocess.run(
        [*submit, "--working-dir", str(jobdir), "--", *stage, "--quiet"],
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    with urllib.request.urlopen(f"{ray_head}/api/jobs/{submission_id}", timeout=10) as response:
        job = json.loads(response.read())
    assert job["status"] == "SUCCEEDED", job
    assert job["entrypoint"].startswith("python -m stages.train --params params.yaml")
    assert "trained 1 epochs (train-" in output  # the stage's own summary line, from the job's log

    runs = list(storage.glob("train-*"))
    assert len(runs) == 1
    checkpoints = [p for p in runs[0].glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1 and (checkpoints[0] / "model.pt").is_file()
    assert [h["epoch"] for h in json.loads((runs[0] / "history.json").read_text())] == [0]
    assert {p.name for p in out.iterdir()} == {"model.pt", "loss.pt", "config.json"}
    _, _, config = load_model(out)
    assert config["train"]["ray"]["num_workers"] == 2 and config["epoch"] == 0
    assert json.loads((live / "metrics.json").read_text())["step"] == 0
