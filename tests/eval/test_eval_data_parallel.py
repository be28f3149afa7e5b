"""`vlmjax eval` data parallel: two processes through jax.distributed (127.0.0.1, one CPU device each, gloo), and
one process's batch split over a `data` mesh axis, each against one process on one device: the same answers, in the
same predictions file, and the same metrics. The model is the tests' tiny random-weight VLM saved as a Hugging Face
directory; its answers are nonsense, but each one a deterministic function of its question."""

import json
import os
import socket
import subprocess
import sys

import pytest

from vlmjax.interop import hf

BENCHMARK = "shapes_vqa"
CONVERSATION = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm, tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tiny_hf"))
  hf.save_pretrained(directory, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     eos_token_ids=tiny_vlm.eos_token_ids, pad_token_id=tiny_vlm.pad_token_id)
  return directory


def _command(checkpoint: str, data_dir: str, out_dir) -> list[str]:
  return [sys.executable, "-m", "vlmjax.cli", "eval", "--checkpoint", checkpoint, "--data_dir", data_dir,
          "--benchmarks", BENCHMARK, "--batch_size", "4", "--out", str(out_dir / "results.json")]


def _env(**extra) -> dict:
  """The test session's environment with one CPU device per process."""
  flags = [flag for flag in os.environ["XLA_FLAGS"].split() if "device_count" not in flag]
  return dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=1", *flags]),
              JAX_PLATFORMS="cpu", **extra)


def _eval_in_two_processes(checkpoint: str, data_dir: str, out_dir) -> None:
  port = _free_port()
  processes = [subprocess.Popen(
      _command(checkpoint, data_dir, out_dir),
      env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


def _predictions(out_dir) -> list[dict]:
  with open(out_dir / "predictions" / f"{BENCHMARK}.jsonl") as f:
    return [json.loads(line) for line in f]


def _seed(out_dir, checkpoint: str, data_dir: str) -> list[dict]:
  """What a killed evaluation leaves in out_dir: the fingerprint of the checkpoint's answers to shapes_vqa and its
  first answers, the first of them one the model would not give (so an answer asked again shows). Returns them."""
  import vlmjax
  from vlmjax.eval import answer_cache, harness, registry

  benchmark = registry.get(BENCHMARK)
  samples = benchmark.samples(data_dir)
  path = str(out_dir / "predictions" / f"{BENCHMARK}.jsonl")
  os.makedirs(os.path.dirname(path))
  answer_cache.rows_made_by(path, harness.fingerprint(vlmjax.load(checkpoint), benchmark, samples, "test"))
  kept = [{"id": s.id, "prompt": s.prompt, "answer": "a kept answer", "target": s.target, "group": s.group}
          for s in samples[:5]]
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in kept)
  return json.loads(json.dumps(kept))


def test_two_processes_give_one_process_s_answers_and_metrics(checkpoint, tiny_shapes_dir, tmp_path):
  """Both resume the same killed evaluation: process 0's kept answers are not asked again, the rest are answered
  once, in order, and the metrics are the same; the report reads the folders."""
  from vlmjax.eval import registry, report

  one, two = tmp_path / "one", tmp_path / "two"
  kept = [_seed(out_dir, checkpoint, tiny_shapes_dir) for out_dir in (one, two)][0]
  run = subprocess.run(_command(checkpoint, tiny_shapes_dir, one), env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  _eval_in_two_processes(checkpoint, tiny_shapes_dir, two)
  rows = _predictions(two)
  assert rows == _predictions(one)  # row for row, in the same order
  assert rows[:5] == kept and len(rows) == len(registry.get(BENCHMARK).samples(tiny_shapes_dir)) > 2 * 2 * 4 + 5
  assert json.loads((two / "results.json").read_text()) == json.loads((one / "results.json").read_text())
  report.write_report([str(one), str(two)], str(tmp_path / "report.md"))
  assert BENCHMARK in (tmp_path / "report.md").read_text()


def test_a_data_mesh_splits_each_batch_and_gives_one_device_s_answers(tiny_vlm, tiny_shapes_dir, tmp_path):
  """Within one process: the weights on a data=2 x tensor=2 mesh, each batch's rows split over data."""
  import numpy as np

  from vlmjax.eval import harness
  from vlmjax.parallel import mesh as mesh_lib

  sharded = tiny_vlm.sharded({"data": 2, "tensor": 2})
  image = np.zeros((16, 16, 3), np.uint8)
  input_ids = np.array([tiny_vlm.prompt_ids(CONVERSATION, 1)] * 4)
  with harness.on_its_mesh(sharded, batch_size=4):
    logits = sharded.logits(input_ids, tiny_vlm.image_processor([image] * 4))
  assert mesh_lib.shard_count(logits)[0] == 2  # the rows, over data
  with pytest.raises(ValueError, match="batch size 3 does not split over the mesh's 2 data x fsdp devices"):
    harness.on_its_mesh(sharded, batch_size=3)

  def run(vlm, name):
    out = tmp_path / name
    results = harness.evaluate(vlm, ["shapes_vqa"], str(out), tiny_shapes_dir, batch_size=4,
                               limits={"shapes_vqa": 12})
    return results, _predictions(out)
  assert run(sharded, "mesh") == run(tiny_vlm, "one")
