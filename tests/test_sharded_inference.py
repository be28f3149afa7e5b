"""Inference over a device mesh (`VLM.sharded`, `vlmjax.load(path, mesh=...)`) on the 8 fake CPU devices: the
weights sharded by the rules table, and logits, `generate_ids`, the engine's tokens and the evaluation harness's
answers equal to one device's."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from vlmjax.infer.engine import Engine
from vlmjax.parallel import mesh as mesh_lib

CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
MESHES = [{"tensor": 2}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}]


@pytest.fixture(scope="module")
def inputs(tiny_vlm):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8))
  return np.array([tiny_vlm.prompt_ids(CONVERSATION, 1)] * 2), tiny_vlm.image_processor([image, image])


@pytest.mark.parametrize("mesh", MESHES, ids=lambda mesh: ",".join(f"{k}={v}" for k, v in mesh.items()))
def test_a_sharded_model_gives_one_device_s_logits_and_tokens(tiny_vlm, inputs, mesh):
  assert len(jax.devices()) >= 8
  sharded = tiny_vlm.sharded(mesh)
  query = sharded.params["decoder"]["layers_0"]["attention"]["query"]["kernel"]  # [embed, heads, head_dim]
  assert mesh_lib.shard_count(query) == (mesh.get("fsdp", 1), mesh.get("tensor", 1), 1)
  input_ids, pixel_values = inputs
  # Sums split over devices add in another order: float32's last bits differ, and tiny_vlm's weights (scaled x3 to
  # make greedy decoding sensitive) amplify them through the layers, to 2e-5 of the logits' scale at most here.
  expected_logits = np.asarray(tiny_vlm.logits(input_ids, pixel_values))
  difference = np.abs(np.asarray(sharded.logits(input_ids, pixel_values)) - expected_logits).max()
  assert difference <= 3e-5 * np.abs(expected_logits).max(), difference
  expected = tiny_vlm.generate_ids(input_ids, pixel_values, max_new_tokens=6)
  np.testing.assert_array_equal(sharded.generate_ids(input_ids, pixel_values, max_new_tokens=6), expected)
  engine = Engine(sharded, num_slots=2, max_len=48, page_size=4).start()
  try:
    request = engine.submit(input_ids[0], pixel_values[:1], max_tokens=6).wait(120)
  finally:
    engine.stop()
  assert request.token_ids == [t for t in expected[0].tolist() if t != tiny_vlm.pad_token_id][:len(request.token_ids)]


def test_a_mesh_that_does_not_divide_the_heads_fails_naming_them(tiny_vlm):
  with pytest.raises(ValueError, match=r"'kv_heads', size 2\) is sharded over mesh axes \('tensor',\) of total size 4"):
    tiny_vlm.sharded({"tensor": 4})
  with pytest.raises(ValueError, match="needs 16 devices"):
    tiny_vlm.sharded({"tensor": 16})


def test_generate_on_a_mesh_from_the_command_line(tiny_vlm, tmp_path):
  import subprocess
  import sys

  from vlmjax.interop import hf
  hf.save_pretrained(str(tmp_path / "tiny"), tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer,
                     tiny_vlm.image_processor, tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=64)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8))
  image.save(tmp_path / "image.png")
  command = [sys.executable, "-m", "vlmjax.cli", "generate", "--checkpoint", str(tmp_path / "tiny"), "--image",
             str(tmp_path / "image.png"), "--prompt", "What colour is the circle?", "--max_new_tokens", "6"]
  run = subprocess.run(command + ["--mesh", "fsdp=4,tensor=2"], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == tiny_vlm.generate([image], ["What colour is the circle?"], max_new_tokens=6)[0].strip()
  bad = subprocess.run(command + ["--mesh", "tensor=4"], capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "kv_heads" in bad.stderr and "Traceback" not in bad.stderr


def test_evaluation_on_a_mesh_gives_one_device_s_answers(tiny_vlm, tiny_shapes_dir, tmp_path):
  """`vlmjax eval --mesh`: the harness asks a sharded model (`chat_batch`) and writes the answers and metrics one
  device writes."""
  from vlmjax.eval import harness

  def answers(vlm, name: str) -> tuple[dict, list[str]]:
    out = tmp_path / name
    results = harness.evaluate(vlm, ["shapes_vqa"], str(out), tiny_shapes_dir, batch_size=4,
                               limits={"shapes_vqa": 12})
    with open(out / "predictions" / "shapes_vqa.jsonl") as f:
      return results, [json.loads(line)["answer"] for line in f]
  alone, sharded = answers(tiny_vlm, "one"), answers(tiny_vlm.sharded({"fsdp": 4, "tensor": 2}), "mesh")
  assert len(alone[1]) == 12 and sharded == alone
