"""The benchmark harness: scoring plumbing, resuming a killed evaluation, and its errors.

The model here is a scripted answerer (it answers from the sample's target, or wrongly on purpose), so the
expected metric values are known exactly; the real model is exercised by the main job and tests/train."""

import json

import pytest

from vlmjax.eval import benchmarks, harness, registry


@pytest.fixture(scope="module")
def data_dir(tiny_shapes_dir):
  return tiny_shapes_dir


class ScriptedAnswerer:
  """Answers VQA questions right except those about colour, and counts the prompts it is asked."""

  def __init__(self, samples):
    self.targets = {_key(s.prompt, s.images[0]): s.target for s in samples}
    self.asked = 0

  def chat_batch(self, conversations, images, max_new_tokens):
    self.asked += len(conversations)
    prompts = [c[0]["content"][-1]["text"] for c in conversations]
    return ["purple-ish" if p.startswith("What colour") else self.targets[_key(p, row[0])][0]
            for p, row in zip(prompts, images)]


def _key(prompt, image):
  return prompt, image.tobytes()


def test_vqa_scores_follow_the_answers_and_a_rerun_asks_nothing(data_dir, tmp_path):
  samples = registry.get("shapes_vqa").samples(data_dir)
  answerer = ScriptedAnswerer(samples)
  results = harness.evaluate(answerer, ["shapes_vqa"], str(tmp_path), data_dir, batch_size=5)["shapes_vqa"]
  assert results["accuracy/colour"] == 0.0
  for kind in ("shape", "count", "existence", "relation"):
    if f"accuracy/{kind}" in results:
      assert results[f"accuracy/{kind}"] == 1.0
  colour = sum(s.group == "colour" for s in samples)
  assert results["accuracy"] == pytest.approx(1 - colour / len(samples))
  asked = answerer.asked
  assert asked >= len(samples)
  again = harness.evaluate(answerer, ["shapes_vqa"], str(tmp_path), data_dir, batch_size=5)["shapes_vqa"]
  assert again == results and answerer.asked == asked  # every answer came from the predictions file


def test_a_killed_evaluation_continues_where_it_stopped(data_dir, tmp_path):
  samples = registry.get("shapes_vqa").samples(data_dir)
  answerer = ScriptedAnswerer(samples)
  path = tmp_path / "predictions" / "shapes_vqa.jsonl"
  path.parent.mkdir()
  done = samples[:7]
  lines = [json.dumps({"id": s.id, "answer": s.target[0]}) for s in done]
  path.write_text("\n".join(lines) + '\n{"id": "cut off mid-wri')  # the kill left half a line
  harness.evaluate(answerer, ["shapes_vqa"], str(tmp_path), data_dir, batch_size=4)
  asked_rows = len(samples) - len(done)
  assert answerer.asked == asked_rows + (-asked_rows % 4)  # full batches, the last one padded


def test_a_bad_line_in_the_middle_names_the_file_and_line(data_dir, tmp_path):
  path = tmp_path / "predictions" / "shapes_vqa.jsonl"
  path.parent.mkdir()
  path.write_text('{"id": "0/0", "answer": "red"}\nnot json\n{"id": "0/1", "answer": "blue"}\n')
  with pytest.raises(ValueError, match=r"shapes_vqa.jsonl, line 2: not a prediction row"):
    harness.evaluate(ScriptedAnswerer([]), ["shapes_vqa"], str(tmp_path), data_dir)


def test_unknown_benchmark_lists_the_available_ones(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"unknown benchmark 'shapes_vqa2'; available: shapes_vqa, shapes_caption"):
    harness.evaluate(ScriptedAnswerer([]), ["shapes_vqa2"], str(tmp_path), data_dir)


def test_boxes_are_read_from_free_text():
  assert benchmarks.parse_box("It is at [12, 30, 25, 44].") == (12.0, 30.0, 25.0, 44.0)
  assert benchmarks.parse_box("no box here") is None
