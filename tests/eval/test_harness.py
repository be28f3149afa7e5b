"""The benchmark harness: scoring plumbing, answers tied to the model that gave them, resuming a killed evaluation,
and its errors.

Most models here are scripted answerers (they answer from the sample's target, or wrongly on purpose), so the
expected metric values are known exactly; two tiny random-weight VLMs show that real models' answers are told
apart; a trained model is exercised by the main job and tests/train."""

import dataclasses
import json

import jax
import pytest

from vlmjax.eval import benchmarks, harness, registry


@pytest.fixture(scope="module")
def data_dir(tiny_shapes_dir):
  return tiny_shapes_dir


class ScriptedAnswerer:
  """Answers VQA questions right except those of one type (`wrong_about`), and counts the prompts it is asked.
  Its fingerprint is its rule: two answerers with the same rule are the same model."""

  def __init__(self, samples, wrong_about="colour", stop_after_batches=None):
    self.targets = {_key(s.prompt, s.images[0]): s.target for s in samples}
    self.wrong_about = wrong_about
    self.stop_after_batches = stop_after_batches
    self.asked = 0

  def fingerprint(self):
    return {"source": "scripted", "digest": f"wrong about {self.wrong_about}"}

  def chat_batch(self, conversations, images, max_new_tokens):
    if self.stop_after_batches is not None and self.asked >= self.stop_after_batches * len(conversations):
      raise KeyboardInterrupt("killed mid-way")
    self.asked += len(conversations)
    prompts = [c[0]["content"][-1]["text"] for c in conversations]
    return ["purple-ish" if self._wrong(p) else self.targets[_key(p, row[0])][0] for p, row in zip(prompts, images)]

  def _wrong(self, prompt):
    return {"colour": prompt.startswith("What colour"), "count": prompt.startswith("How many")}[self.wrong_about]


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


def test_the_built_in_benchmarks_read_the_test_split_unless_told(data_dir, tiny_shapes_splits):
  test_images = {s.id.split("/")[0] for s in registry.get("shapes_vqa").samples(data_dir)}
  validation_images = {s.id.split("/")[0] for s in registry.get("shapes_vqa", "validation").samples(data_dir)}
  assert len(test_images) == tiny_shapes_splits["test"] and len(validation_images) == tiny_shapes_splits["validation"]
  with pytest.raises(ValueError, match="read split test or validation, not 'train'"):
    registry.get("shapes_vqa", "train")


def test_two_models_scored_into_one_folder_each_get_their_own_answers(data_dir, tmp_path):
  samples = registry.get("shapes_vqa").samples(data_dir)
  alone = {rule: harness.evaluate(ScriptedAnswerer(samples, rule), ["shapes_vqa"], str(tmp_path / rule), data_dir,
                                  batch_size=4)["shapes_vqa"] for rule in ("colour", "count")}
  assert alone["colour"] != alone["count"]
  shared = str(tmp_path / "shared")
  for rule in ("colour", "count", "colour"):
    answerer = ScriptedAnswerer(samples, rule)
    assert harness.evaluate(answerer, ["shapes_vqa"], shared, data_dir, batch_size=4)["shapes_vqa"] == alone[rule]
    assert answerer.asked >= len(samples)  # nothing of the other model's was reused


def test_a_killed_evaluation_resumes_with_the_answers_it_had(data_dir, tmp_path):
  samples = registry.get("shapes_vqa").samples(data_dir)
  with pytest.raises(KeyboardInterrupt):
    harness.evaluate(ScriptedAnswerer(samples, stop_after_batches=2), ["shapes_vqa"], str(tmp_path), data_dir,
                     batch_size=4)
  path = tmp_path / "predictions" / "shapes_vqa.jsonl"
  done = path.read_text().splitlines()
  assert len(done) == 8
  with open(path, "a") as f:
    f.write('{"id": "cut off mid-wri')  # a kill mid-write leaves half a line
  resumed = ScriptedAnswerer(samples)  # the same model, started again
  results = harness.evaluate(resumed, ["shapes_vqa"], str(tmp_path), data_dir, batch_size=4)["shapes_vqa"]
  asked_rows = len(samples) - len(done)
  assert resumed.asked == asked_rows + (-asked_rows % 4)  # full batches, the last one padded
  assert path.read_text().splitlines()[:8] == done  # the answers it had, kept
  fresh = harness.evaluate(ScriptedAnswerer(samples), ["shapes_vqa"], str(tmp_path / "fresh"), data_dir)
  assert results == fresh["shapes_vqa"]


def test_a_bad_line_in_the_middle_names_the_file_and_line(data_dir, tmp_path):
  answerer = ScriptedAnswerer([])
  benchmark = registry.get("shapes_vqa")
  path = tmp_path / "predictions" / "shapes_vqa.jsonl"
  path.parent.mkdir()
  (tmp_path / "predictions" / "shapes_vqa.fingerprint.json").write_text(json.dumps(
      harness.fingerprint(answerer, benchmark, benchmark.samples(data_dir), "test")))  # this model's answers
  path.write_text('{"id": "0/0", "answer": "red"}\nnot json\n{"id": "0/1", "answer": "blue"}\n')
  with pytest.raises(ValueError, match=r"shapes_vqa.jsonl, line 2: not a prediction row"):
    harness.evaluate(answerer, ["shapes_vqa"], str(tmp_path), data_dir)


def test_unknown_benchmark_lists_the_available_ones(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"unknown benchmark 'shapes_vqa2'; available: shapes_vqa, shapes_caption"):
    harness.evaluate(ScriptedAnswerer([]), ["shapes_vqa2"], str(tmp_path), data_dir)


def test_boxes_are_read_from_free_text():
  assert benchmarks.parse_box("It is at [12, 30, 25, 44].") == (12.0, 30.0, 25.0, 44.0)
  assert benchmarks.parse_box("no box here") is None


def test_two_real_models_scored_into_one_folder_each_get_their_own_answers(tiny_vlm, data_dir, tmp_path):
  """The shared tiny VLM, and the same with its weights reversed in sign: two models that answer differently."""
  first = dataclasses.replace(tiny_vlm)
  second = dataclasses.replace(tiny_vlm, params=jax.tree.map(lambda p: -p, tiny_vlm.params))
  assert first.fingerprint() != second.fingerprint()
  assert first.fingerprint() == dataclasses.replace(tiny_vlm).fingerprint()  # a copy is the same model

  def answers(vlm, out_dir):
    results = harness.evaluate(vlm, ["shapes_vqa"], str(out_dir), data_dir, batch_size=8, limits={"shapes_vqa": 8})
    rows = (out_dir / "predictions" / "shapes_vqa.jsonl").read_text().splitlines()
    return results, [json.loads(row)["answer"] for row in rows]

  alone = [answers(vlm, tmp_path / name) for vlm, name in ((first, "first"), (second, "second"))]
  assert alone[0][1] != alone[1][1]  # the two models answer differently
  assert answers(first, tmp_path / "shared") == alone[0]
  assert answers(second, tmp_path / "shared") == alone[1]
  assert answers(first, tmp_path / "shared") == alone[0]
