"""Benchmarks from files on disk, written here in exactly their formats and answered by a scripted model whose
answers make every metric value known by hand."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmjax.eval import benchmarks, file_benchmarks, harness, registry, retrieval


def _png(path, value):
  Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


class ScriptedModel:
  """Answers from the prompt and the image it is shown, by rules the tests set."""

  def __init__(self, rule):
    self.rule = rule
    self.seen = []

  def fingerprint(self):
    return {"source": "scripted", "digest": str(id(self))}  # each instance answers by its own rule

  def chat_batch(self, conversations, images, max_new_tokens):
    prompts = [c[0]["content"][-1]["text"] for c in conversations]
    self.seen += [(p, row[0]) for p, row in zip(prompts, images)]
    return [self.rule(p, row[0]) for p, row in zip(prompts, images)]


@pytest.fixture
def image_dir(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  _png(folder / "COCO_val2014_000000000001.jpg", 250)  # bright
  _png(folder / "COCO_val2014_000000000002.jpg", 5)  # dark
  return folder


def _vqa_files(tmp_path):
  questions = [{"question_id": 10, "image_id": 1, "question": "How bright?"},
               {"question_id": 20, "image_id": 2, "question": "How many?"},
               {"question_id": 30, "image_id": 2, "question": "What animal?"}]
  annotations = [
      {"question_id": 10, "answer_type": "other", "answers": [{"answer": "bright"}] * 10},
      {"question_id": 20, "answer_type": "number", "answers": [{"answer": "two"}] * 2 + [{"answer": "three"}] * 8},
      {"question_id": 30, "answer_type": "other", "answers": [{"answer": "cat"}]},  # GQA-style: one answer
  ]
  (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
  (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
  return tmp_path / "q.json", tmp_path / "a.json"


def test_vqav2_files_through_the_harness(tmp_path, image_dir):
  questions, annotations = _vqa_files(tmp_path)

  def rule(prompt, image):
    assert prompt.endswith("\n" + file_benchmarks.SHORT_ANSWER)
    if prompt.startswith("How bright"):
      return "bright" if image.mean() > 128 else "dark"  # the image is read from the question's image_id
    return {"How many?": "2", "What animal?": "The cat."}[prompt.split("\n")[0]]

  spec = f"vqav2:{questions}:{annotations}:{image_dir}"
  results = harness.evaluate(ScriptedModel(rule), [spec], str(tmp_path / "out"), "", batch_size=2)["vqav2"]
  # 1.0 (10 of 10 agree); 0.6 ("2" is "two": 2 of 10 humans); 1.0 (one reference: exact after normalization).
  assert results["accuracy"] == pytest.approx((1.0 + 0.6 + 1.0) / 3)
  assert results["accuracy/number"] == pytest.approx(0.6)
  assert results["accuracy/other"] == pytest.approx(1.0)
  rows = [json.loads(line) for line in (tmp_path / "out" / "predictions" / "vqav2.jsonl").read_text().splitlines()]
  assert [row["id"] for row in rows] == ["10", "20", "30"]


def test_a_name_keys_the_results_and_a_pattern_names_the_images(tmp_path, image_dir):
  questions, annotations = _vqa_files(tmp_path)
  (image_dir / "2.png").write_bytes((image_dir / "COCO_val2014_000000000002.jpg").read_bytes())
  _png(image_dir / "1.png", 0)  # now image 1 is dark: the pattern, not the COCO name, chose it
  spec = f"textvqa=vqav2:{questions}:{annotations}:{image_dir}:{{image_id}}.png"
  model = ScriptedModel(lambda prompt, image: "bright" if image.mean() < 128 else "x")  # right for 1.png only
  results = harness.evaluate(model, [spec], str(tmp_path), "", batch_size=4)
  assert list(results) == ["textvqa"] and results["textvqa"]["accuracy"] == pytest.approx(1 / 3)
  assert (tmp_path / "predictions" / "textvqa.jsonl").exists()


def test_coco_captions_files(tmp_path, image_dir):
  captions = {1: ["a bright white square fills the whole picture", "the picture is a bright white square"],
              2: ["a dark black square covers the image", "black is all there is in this dark image"]}
  (tmp_path / "captions.json").write_text(json.dumps({
      "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                 {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
      "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c} for i, cs in captions.items()
                      for j, c in enumerate(cs)]}))
  spec = f"coco_captions:{tmp_path / 'captions.json'}:{image_dir}"

  def exact(prompt, image):
    assert prompt == file_benchmarks.CAPTION_PROMPT
    return captions[1 if image.mean() > 128 else 2][0]

  results = harness.evaluate(ScriptedModel(exact), [spec], str(tmp_path / "exact"), "")["coco_captions"]
  # A caption equal to a reference: every n-gram precision is 1; CIDEr-D's cosine with that reference is 1.
  assert results["bleu4"] == pytest.approx(1.0, abs=1e-6)
  assert 5.0 < results["cider"] <= 10.0
  swapped = harness.evaluate(ScriptedModel(lambda p, image: captions[2 if image.mean() > 128 else 1][0]), [spec],
                             str(tmp_path / "swapped"), "")["coco_captions"]
  assert swapped["cider"] < 1.0 and swapped["bleu4"] < 0.5


def _pope_file(path, labels):
  path.write_text("".join(json.dumps({"question_id": i, "image": "COCO_val2014_000000000001.jpg",
                                      "text": f"Is there a thing {i}?", "label": label}) + "\n"
                          for i, label in enumerate(labels)))
  return path


def test_pope_files_score_each_split(tmp_path, image_dir):
  random = _pope_file(tmp_path / "coco_pope_random.json", ["yes", "yes", "no", "no"])
  adversarial = _pope_file(tmp_path / "coco_pope_adversarial.json", ["yes", "no", "no", "no"])
  spec = f"pope:{random}:{adversarial}:{image_dir}"
  results = harness.evaluate(ScriptedModel(lambda p, image: "Yes, there is."), [spec], str(tmp_path), "")["pope"]
  assert results["random/precision"] == 0.5 and results["random/recall"] == 1.0
  assert results["adversarial/precision"] == 0.25 and results["adversarial/accuracy"] == 0.25
  assert results["yes_ratio"] == 1.0 and results["precision"] == pytest.approx(3 / 8)
  with pytest.raises(ValueError, match=r"are both POPE split 'random'"):
    registry.get(f"pope:{random}:{random}:{image_dir}")


def test_a_malformed_pope_line_names_the_file_and_line(tmp_path, image_dir):
  path = _pope_file(tmp_path / "coco_pope_popular.json", ["yes", "no"])
  path.write_text(path.read_text() + '{"question_id": 9, "image": "COCO_val2014_000000000001.jpg", "text": "Q?"\n')
  with pytest.raises(ValueError, match=r"coco_pope_popular.json, line 3: not valid JSON"):
    harness.evaluate(ScriptedModel(lambda p, i: "no"), [f"pope:{path}:{image_dir}"], str(tmp_path), "")


def test_spec_errors_say_what_to_write(tmp_path, image_dir):
  with pytest.raises(ValueError, match=r"unknown benchmark 'vqa'; available: shapes_vqa, .*shapes_retrieval, "
                                       r"or files as KIND:PATH:\.\.\. with KIND one of vqav2, coco_captions, pope"):
    registry.get("vqa")
  with pytest.raises(ValueError, match=r"unknown file kind 'vqa'; kinds: vqav2:QUESTIONS_JSON:ANNOTATIONS_JSON"):
    registry.get("vqa:q.json")
  with pytest.raises(ValueError, match=r"expected coco_captions:CAPTIONS_JSON:IMAGE_DIR"):
    registry.get(f"coco_captions:{image_dir}")
  with pytest.raises(FileNotFoundError, match=r"absent/q.json does not exist"):
    harness.evaluate(ScriptedModel(None), [f"vqav2:{tmp_path}/absent/q.json:a.json:{image_dir}"], str(tmp_path), "")


def test_the_eval_help_gives_every_file_kind():
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "eval", "--help"], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  text = " ".join(result.stdout.split())  # absl wraps the help text
  for kind, file_kind in registry.KINDS.items():
    assert f"{kind}:{file_kind.usage}" in text
  for name in [*benchmarks.NAMES, *retrieval.BENCHMARKS]:
    assert name in text


def test_eval_names_a_missing_benchmark_file_before_loading_the_model(tmp_path):
  spec = f"vqav2:{tmp_path}/absent.json:{tmp_path}/a.json:{tmp_path}"
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "eval", "--checkpoint", str(tmp_path / "no_model"),
                           "--out", str(tmp_path / "results.json"), "--benchmarks", spec],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert f"vlmjax eval: benchmark {spec!r}: {tmp_path}/absent.json does not exist" in result.stderr
