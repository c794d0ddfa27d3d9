"""A real `ray start --head` on 127.0.0.1 and `ray job submit` of dataengine/run.py: same shards as the embedded run.

This is what docs/data-engine.md tells a user to do, with both documented snags handled: token
authentication (Ray >= 2.5x enables it; head and client share RAY_AUTH_TOKEN) and the head's PATH
(the job's `python` is the first one on the PATH the head was started with: the venv's).
The head runs with `--block` in its own process group, and teardown ends that group by id: `ray
stop` would kill every Ray on the machine, including other sessions'.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with token auth; yields (dashboard address, env for clients)."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    venv_bin = Path(sys.executable).parent
    ray_bin = venv_bin / "ray"
    if not ray_bin.exists():
        pytest.skip("the ray CLI is not installed next to this python")
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=generate_new_authentication_token(), HF_HUB_OFFLINE="1")
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(rt_env), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr), "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    log = open(tmp_path / "ray-head.log", "wb")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.skip(f"Ray could not start here: {(tmp_path / 'ray-head.log').read_text()[-1500:]}")
            request = urllib.request.Request(
                f"{address}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head did not come up: {(tmp_path / 'ray-head.log').read_text()[-1500:]}")
            time.sleep(0.5)
        yield address, env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_gives_the_embedded_run_output(ray_head, repo_root, sample_images, reference_run, tmp_path):
    address, env = ray_head
    # A small working dir: the package and the pipelines file (the repo's .venv/.cache stay home).
    workdir = tmp_path / "job"
    shutil.copytree(repo_root / "dataengine", workdir / "dataengine", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo_root / "pipelines.yaml", workdir / "pipelines.yaml")
    from dataengine.config import tiny_models_dir

    out = tmp_path / "mined-by-job"
    runtime_env = {"env_vars": {"LARGEN_TINY_MODELS": str(tiny_models_dir()), "HF_HUB_OFFLINE": "1"}}
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(workdir),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "dataengine/run.py", "--config", "pipelines.yaml", "--pipeline", "sample", "--profile", "tiny",
        "--input", str(sample_images), "--output", str(out), "--no-progress",
    ]  # fmt: skip
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    assert "3 shard(s) written" in job.stdout

    names = sorted(p.name for p in reference_run.iterdir() if p.suffix in (".tar", ".parquet"))
    assert names == sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".parquet"))
    for name in names:
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name
