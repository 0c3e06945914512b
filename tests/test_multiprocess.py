"""2 processes × 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) = 1 process × 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from moe_jax import distributed
from tests import multiprocess_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 20-30 s on 2 cores; CI runs the slow set
def test_two_processes_reproduce_one_process_losses(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                str(i),
                "2",
                str(port),
                str(tmp_path / f"p{i}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    # The single-process reference runs while the workers start up.
    expected = {ep: multiprocess_worker.run_steps(ep) for ep in ("gspmd", "shard_map")}
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    for i in range(2):
        got = json.loads((tmp_path / f"p{i}.json").read_text())
        for ep, losses in expected.items():
            np.testing.assert_allclose(got[ep], losses, rtol=TOL, atol=TOL, err_msg=f"process {i}, {ep}")
    assert expected["gspmd"][-1] < expected["gspmd"][0]


def test_distributed_arguments_come_together():
    with pytest.raises(ValueError, match="together"):
        distributed.initialize("127.0.0.1:1234", None, None)
    assert distributed.process_slice(8) == slice(0, 8)  # one process feeds the whole batch
