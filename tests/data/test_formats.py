"""The on-disk formats, from tiny files written in exactly those formats."""

import json

import numpy as np
import pytest
from PIL import Image

from vlmjax.data import formats


def _png(path, colour):
  Image.fromarray(np.full((6, 8, 3), colour, np.uint8)).save(path)


@pytest.fixture
def images(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  _png(folder / "a.png", 10)
  _png(folder / "COCO_val2014_000000000042.jpg", 200)
  return folder


def test_llava_instructions(tmp_path, images):
  path = tmp_path / "llava.json"
  path.write_text(json.dumps([
      {"id": "x1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                       {"from": "gpt", "value": "A square."}]},
      {"id": "x2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]))
  source = formats.LlavaInstructions(str(path), str(images))
  assert len(source) == 2
  first = source[0]
  assert first["image"].shape == (6, 8, 3) and first["image"][0, 0, 0] == 10
  assert first["conversation"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                                   {"role": "assistant", "content": "A square."}]
  assert source[1]["image"] is None  # a text-only sample


def test_llava_missing_folder_or_file_is_one_clear_error(tmp_path, images):
  path = tmp_path / "llava.json"
  path.write_text(json.dumps([{"image": "nothere.png", "conversations": []}]))
  with pytest.raises(FileNotFoundError, match=r"names the image nothere.png, which is not in .*images"):
    formats.LlavaInstructions(str(path), str(images))
  with pytest.raises(FileNotFoundError, match=r"the image folder .*nofolder of .*llava.json does not exist"):
    formats.LlavaInstructions(str(path), str(tmp_path / "nofolder"))
  path.write_text("[{not json")
  with pytest.raises(ValueError, match=r"llava.json: not valid JSON"):
    formats.LlavaInstructions(str(path), str(images))


def test_a_corrupt_image_raises_with_its_path_on_access(tmp_path, images):
  (images / "bad.png").write_bytes(b"not a png")
  path = tmp_path / "llava.json"
  path.write_text(json.dumps([{"image": "bad.png", "conversations": [{"from": "human", "value": "<image>"}]}]))
  source = formats.LlavaInstructions(str(path), str(images))
  with pytest.raises(ValueError, match=r"bad.png: not a decodable image"):
    source[0]


def test_coco_captions(tmp_path, images):
  path = tmp_path / "captions.json"
  path.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.png"}],
                              "annotations": [{"image_id": 7, "id": 1, "caption": "a dark square"},
                                              {"image_id": 7, "id": 2, "caption": "something grey"}]}))
  source = formats.CocoCaptions(str(path), str(images))
  record = source[0]
  assert record["image_id"] == 7 and record["captions"] == ["a dark square", "something grey"]


def test_vqav2(tmp_path, images):
  questions = tmp_path / "questions.json"
  annotations = tmp_path / "annotations.json"
  questions.write_text(json.dumps({"questions": [{"question_id": 420, "image_id": 42, "question": "What colour?"}]}))
  annotations.write_text(json.dumps({"annotations": [{"question_id": 420, "image_id": 42, "question_type": "what",
                                                      "answer_type": "other",
                                                      "answers": [{"answer": "white", "answer_id": i}
                                                                  for i in range(10)]}]}))
  record = formats.VqaV2(str(questions), str(annotations), str(images))[0]
  assert record["question"] == "What colour?" and record["answers"] == ["white"] * 10
  assert record["image"][0, 0, 0] > 150
  annotations.write_text(json.dumps({"annotations": []}))
  with pytest.raises(ValueError, match=r"has no annotation for question 420"):
    formats.VqaV2(str(questions), str(annotations), str(images))
