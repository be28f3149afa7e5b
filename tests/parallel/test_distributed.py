"""What the processes of `vlmjax eval` exchange (`vlmjax/parallel/distributed.py`), in 2 processes on 127.0.0.1
through jax.distributed: texts of any length and count gathered in process order, process 0's flags broadcast, and
the processes whose text differs from process 0's named."""

import json
import os
import socket
import subprocess
import sys

SCRIPT = """
import json, os
import numpy as np
from vlmjax.parallel import distributed
distributed.initialize_from_environment()
index = int(os.environ["JAX_PROCESS_ID"])
texts = [["a blue square", "", "ünïcode ✓"], ["x" * 300]][index]
flags = np.array([True, False, True]) if index == 0 else np.zeros(3, bool)
print(json.dumps({"texts": distributed.gather_texts(texts),
                  "none": distributed.gather_texts(["only 0"] if index == 0 else []),
                  "flags": distributed.broadcast_flags(flags).tolist(),
                  "same": distributed.differing_processes("model A"),
                  "differing": distributed.differing_processes(f"model {index}")}))
"""


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def test_two_processes_exchange_texts_flags_and_digests():
  port = _free_port()
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag]
  processes = [subprocess.Popen(
      [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=1", *flags]),
               JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    outputs.append(json.loads(stdout.splitlines()[-1]))
  expected = {"texts": ["a blue square", "", "ünïcode ✓", "x" * 300], "none": ["only 0"],
              "flags": [True, False, True], "same": [], "differing": [1]}
  assert outputs == [expected, expected]
