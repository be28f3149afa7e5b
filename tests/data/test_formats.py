"""The on-disk formats, from tiny files written in exactly those formats."""

import base64
import csv
import io
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
      {"id": "x2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
      {"id": "x3", "image": ["a.png", "COCO_val2014_000000000042.jpg"], "conversations": []}]))
  source = formats.LlavaInstructions(str(path), str(images))
  assert len(source) == 3
  first = source[0]
  [image] = first["images"]
  assert image.shape == (6, 8, 3) and image[0, 0, 0] == 10
  assert first["conversation"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                                   {"role": "assistant", "content": "A square."}]
  assert source[1]["images"] == []  # a text-only sample
  assert [image[0, 0, 0] > 150 for image in source[2]["images"]] == [False, True]  # a list of images, in order


def test_llava_missing_images_fail_their_entry_and_a_missing_folder_or_file_fails_at_once(tmp_path, images):
  path = tmp_path / "llava.json"
  path.write_text(json.dumps([{"conversations": []}, {"image": "nothere.png", "conversations": []},
                              {"image": 3, "conversations": []},
                              {"conversations": [{"from": "system", "value": "x"}]}]))
  source = formats.LlavaInstructions(str(path), str(images))  # a missing image fails only the entry naming it
  assert source[0]["images"] == []
  with pytest.raises(FileNotFoundError, match=r"llava.json, entry 1: the image nothere.png is not in .*images"):
    source[1]
  with pytest.raises(ValueError, match=r"llava.json, entry 2: the image 3 is not a file name"):
    source[2]
  with pytest.raises(ValueError, match=r"llava.json, entry 3: unknown speaker 'system'"):
    source[3]
  with pytest.raises(FileNotFoundError, match=r"the image folder .*nofolder of .*llava.json does not exist"):
    formats.LlavaInstructions(str(path), str(tmp_path / "nofolder"))
  path.write_text(json.dumps([{"conversations": []}, {"image": "a.png"}]))
  with pytest.raises(ValueError, match=r"llava.json, entry 1: no 'conversations' list"):
    formats.LlavaInstructions(str(path), str(images))
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
  path.write_text(json.dumps({"images": [{"id": 7, "file_name": "gone.png"}], "annotations": []}))
  with pytest.raises(FileNotFoundError, match=r"names the image gone.png"):  # evaluation: all or nothing
    formats.CocoCaptions(str(path), str(images))
  source = formats.CocoCaptions(str(path), str(images), check_images=False)  # training: that image's record fails
  with pytest.raises(ValueError, match=r"gone.png: not a decodable image"):
    source[0]


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


def test_vqav2_and_coco_entries_without_their_fields_are_named(tmp_path, images):
  questions = tmp_path / "questions.json"
  annotations = tmp_path / "annotations.json"
  questions.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 42, "question": "Q?"},
                                                 {"question_id": 2, "question": "No image?"}]}))
  annotations.write_text(json.dumps({"annotations": []}))
  with pytest.raises(ValueError, match=r"questions.json, question 1: no 'image_id'"):
    formats.VqaV2(str(questions), str(annotations), str(images))
  captions = tmp_path / "captions.json"
  captions.write_text(json.dumps({"annotations": []}))
  with pytest.raises(ValueError, match=r"captions.json: no 'images' list"):
    formats.CocoCaptions(str(captions), str(images))


def test_evaluation_sources_give_annotations_without_decoding_images(tmp_path, images):
  path = tmp_path / "captions.json"
  path.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.png"}],
                              "annotations": [{"image_id": 7, "id": 1, "caption": "a dark square"}]}))
  source = formats.CocoCaptions(str(path), str(images))
  (images / "a.png").write_bytes(b"corrupt now")  # the annotation still reads; the image raises
  assert source.annotation(0) == {"image_id": 7, "captions": ["a dark square"]}
  with pytest.raises(ValueError, match=r"a.png: not a decodable image"):
    source.image(0)


def _pope_lines(*rows):
  return "".join(json.dumps(row) + "\n" for row in rows)


def test_pope_questions(tmp_path, images):
  path = tmp_path / "coco_pope_random.json"
  path.write_text(_pope_lines({"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "no"},
                              {"question_id": 2, "image": "a.png", "text": "Is there a cat?", "label": "Yes"}))
  source = formats.PopeQuestions(str(path), str(images))
  assert len(source) == 2
  assert source.annotation(1) == {"question_id": 2, "question": "Is there a cat?", "label": "yes"}
  assert source[0]["image"][0, 0, 0] == 10 and source[0]["label"] == "no"


@pytest.mark.parametrize("lines, error", [
    ('{"question_id": 1, "image": "a.png", "text": "Q?", "label": "no"}\n{"question_id": 2,\n',
     r"coco_pope_random.json, line 2: not valid JSON"),
    ('\n{"question_id": 1, "image": "a.png", "text": "Q?"}\n', r"coco_pope_random.json, line 2: no 'label'"),
    ('{"question_id": 1, "image": "a.png", "text": "Q?", "label": "maybe"}\n',
     r"coco_pope_random.json, line 1: label 'maybe' is neither 'yes' nor 'no'"),
    ('{"question_id": 1, "image": "b.png", "text": "Q?", "label": "no"}\n', r"names the image b.png"),
])
def test_pope_errors_name_the_file_and_line(tmp_path, images, lines, error):
  path = tmp_path / "coco_pope_random.json"
  path.write_text(lines)
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    formats.PopeQuestions(str(path), str(images))


def _base64_png(colour):
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 5, 3), colour, np.uint8)).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path, rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                                   "l2-category")):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)  # as VLMEvalKit's dump writes a TSV
    writer.writerow(header)
    writer.writerows(rows)


def test_mmbench_questions(tmp_path):
  path = tmp_path / "mmbench.tsv"
  _write_tsv(path, [
      (0, "Which shape?\nLook closely.", "A hint", "circle", "square", "star", "heart", "B", "shapes", _base64_png(30),
       "coarse_perception"),
      (1, "Is it red?", "nan", "yes", "no", "", "", "A", "colour", _base64_png(200), ""),
  ])
  source = formats.MmbenchQuestions(str(path))
  assert len(source) == 2 and not source.circular
  assert source.annotation(0) == {"index": 0, "g_index": 0, "question": "Which shape?\nLook closely.",
                                  "hint": "A hint", "options": {"A": "circle", "B": "square", "C": "star",
                                                                "D": "heart"},
                                  "answer": "B", "category": "shapes", "l2_category": "coarse_perception", "line": 2}
  second = source[1]
  assert second["hint"] == "" and second["options"] == {"A": "yes", "B": "no"} and second["answer"] == "A"
  assert second["line"] == 4 and second["l2_category"] == ""  # the first question's quoted newline: lines 2-3
  assert second["image"].shape == (4, 5, 3) and second["image"][0, 0, 0] == 200


def test_mmbench_cells_as_pandas_reads_them(tmp_path):
  # VLMEvalKit reads TSVs with pandas: "None", "NA", "nan"... are empty cells, so option C "None" is no option.
  path = tmp_path / "mmbench.tsv"
  _write_tsv(path, [(3, "Q?", "NA", "a", "b", "None", "", "A", "", _base64_png(0), "null")])
  record = formats.MmbenchQuestions(str(path)).annotation(0)
  assert record["options"] == {"A": "a", "B": "b"} and record["hint"] == "" and record["l2_category"] == ""


def test_mmbench_circular_copies_and_image_references(tmp_path):
  # A copy's image cell holds its question's index (VLMEvalKit's image_base.py); its question is index % 1e6, or
  # the g_index column where there is one.
  path = tmp_path / "mmbench.tsv"
  rows = [(7, "Q?", "", "x", "y", "", "", "A", "c", _base64_png(90), "l2"),
          (1000007, "Q?", "", "y", "x", "", "", "B", "c", "7", "l2"),
          (8, "R?", "", "x", "y", "", "", "B", "c", "7", "l2")]  # another question on the same image
  _write_tsv(path, rows)
  source = formats.MmbenchQuestions(str(path))
  assert source.circular and [source.annotation(i)["g_index"] for i in range(3)] == [7, 7, 8]
  assert source.image(1)[0, 0, 0] == 90 and source.image(2)[0, 0, 0] == 90
  header = ("index", "question", "A", "B", "answer", "image", "g_index")
  _write_tsv(path, [(5, "Q?", "x", "y", "A", _base64_png(1), 5), (20, "Q?", "y", "x", "B", "5", 5)], header)
  source = formats.MmbenchQuestions(str(path))
  assert source.circular and source.annotation(1)["g_index"] == 5 and source.annotation(1)["category"] == ""


def test_mmbench_errors_name_the_file_line_and_field(tmp_path):
  path = tmp_path / "mmbench.tsv"
  image = _base64_png(0)
  # The first question spans lines 2-3 (a quoted newline), so the second question starts on line 4.
  _write_tsv(path, [(0, "Two\nlines", "", "a", "b", "", "", "A", "x", image, ""),
                    (1, "Q?", "", "a", "b", "", "", "C", "x", image, "")])
  with pytest.raises(ValueError, match=r"mmbench.tsv, line 4, 'answer': 'C' is not one of the option letters A, B"):
    formats.MmbenchQuestions(str(path))
  _write_tsv(path, [(0, "Q?", "", "a", "b", "", "", "A", "x", image, ""), (1, "Q?", "", "a", "b")])
  with pytest.raises(ValueError, match=r"mmbench.tsv, line 3: 5 fields where the header has 11 \(the row ends "
                                       r"before 'C'\)"):
    formats.MmbenchQuestions(str(path))
  _write_tsv(path, [(0, "Q?", "a", "b", "A", image)], header=("index", "question", "A", "B", "answer", "picture"))
  with pytest.raises(ValueError, match=r"mmbench.tsv, line 1: no 'image' column"):
    formats.MmbenchQuestions(str(path))
  _write_tsv(path, [(0, "Q?", "", "a", "b", "", "", "A", "x", image, ""), (1, "Q?", "", "a", "b", "", "", "A", "x",
                                                                          "not base64 of an image" * 4, "")])
  source = formats.MmbenchQuestions(str(path))
  with pytest.raises(ValueError, match=r"mmbench.tsv, line 3, 'image': not base64 of a PNG/JPEG"):
    source.image(1)
  with pytest.raises(FileNotFoundError, match=r"the MMBench TSV .*absent.tsv does not exist"):
    formats.MmbenchQuestions(str(tmp_path / "absent.tsv"))
