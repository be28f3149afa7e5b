"""The field's benchmarks (field_benchmarks.py, exam_benchmarks.py, document_benchmarks.py): each read from a small
file written here in exactly its official release's format, and each official scorer (field_metrics.py) held to
worked cases computed by hand from the official code, the reasoning beside each number."""

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmjax.eval import exam_benchmarks, field_metrics, harness, registry
from vlmjax.eval.file_benchmarks import SHORT_ANSWER
from vlmjax.eval.mmbench import LETTER_ANSWER


def _png(path, value, size=(8, 6)):
  """A tiny image of one grey level (its mean identifies it), size (width, height)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
  return path


def _png_bytes(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _levels(sample):
  return [int(image.mean()) for image in sample.read_images()]


def _listed(spec):
  benchmark = registry.get(spec)
  return benchmark, benchmark.samples("")


# ---------------------------------------------------------------------------------------------------------------
# MME: eval_tool/calculation.py.
# ---------------------------------------------------------------------------------------------------------------


def _mme_dir(tmp_path):
  root = tmp_path / "MME_Benchmark_release_version"
  # existence: flat (images beside their question files); artwork: images/ + questions_answers_YN/.
  _png(root / "existence" / "000000006040.jpg", 10)
  (root / "existence" / "000000006040.txt").write_text(
      "Is there a train in this image? Please answer yes or no.\tYes\n"
      "Is there a bed in this image? Please answer yes or no.\tNo\n")
  _png(root / "existence" / "000000006471.png", 20)
  (root / "existence" / "000000006471.txt").write_text(
      "Is there a baseball bat in this image? Please answer yes or no.\tYes\n"
      "Is there a giraffe in this image?  Please answer yes or no.\tNo\n\n")  # a double space, a blank line
  _png(root / "artwork" / "images" / "10002.jpg", 30)
  (root / "artwork" / "questions_answers_YN").mkdir()
  (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
      "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
      "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
  _png(root / "code_reasoning" / "0020.png", 40)
  (root / "code_reasoning" / "0020.txt").write_text(
      "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
      "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n")
  (root / "eval_tool").mkdir()  # not a subtask: ignored
  return root


def test_mme_reads_both_layouts(tmp_path):
  _, samples = _listed(f"mme:{_mme_dir(tmp_path)}")
  assert [s.id for s in samples] == ["existence/000000006040/1", "existence/000000006040/2",
                                     "existence/000000006471/1", "existence/000000006471/2",
                                     "artwork/10002/1", "artwork/10002/2", "code_reasoning/0020/1",
                                     "code_reasoning/0020/2"]
  # LLaVA-1.5's prompt: " Please answer yes or no." gives way to the short-answer instruction.
  assert samples[0].prompt == f"Is there a train in this image?\n{SHORT_ANSWER}"
  assert samples[3].prompt == f"Is there a giraffe in this image? \n{SHORT_ANSWER}"
  assert [s.target for s in samples[:2]] == ["yes", "no"]
  assert samples[4].group == "artwork/10002"
  assert [_levels(s) for s in samples[::2]] == [[10], [20], [30], [40]]


def test_mme_answers_as_calculation_py_parses_them():
  # parse_pred_ans: lowercased; exactly yes/no, else 'yes' then 'no' looked for in the first 4 characters.
  assert field_metrics.mme_answer("Yes") == "yes"
  assert field_metrics.mme_answer("No, there is not.") == "no"  # "no, " holds "no"
  assert field_metrics.mme_answer("There is a train.") == "other"  # "ther"
  assert field_metrics.mme_answer("Not really") == "no"  # "not " holds "no"
  assert field_metrics.mme_answer("yesno") == "yes"  # 'yes' is looked for first
  assert field_metrics.mme_answer("I think yes") == "other"  # "i th": only the first four characters count
  assert field_metrics.mme_answer("\nYes\n") == "yes"  # stripped, on one line


def test_mme_scores_by_hand(tmp_path):
  benchmark, samples = _listed(f"mme:{_mme_dir(tmp_path)}")
  answers = ["Yes", "No, there is not.",  # existence image 1: both right
             "There is a bat.", "no",  # existence image 2: 'other' (wrong), right
             "yes", "Yes",  # artwork: right, wrong
             "Yes", "No"]  # code_reasoning: both right
  results = benchmark.score(samples, answers)
  # existence: acc = 3/4 = 0.75, acc+ = 1/2 (image 1 only), score = 100 (0.75 + 0.5) = 125.
  assert results["existence/acc"] == 0.75 and results["existence/acc_plus"] == 0.5
  assert results["existence/score"] == pytest.approx(125.0)
  # artwork: acc = 1/2, acc+ = 0: 50. Perception = 125 + 50 (subtasks present only).
  assert results["artwork/score"] == pytest.approx(50.0)
  assert results["perception"] == pytest.approx(175.0)
  # code_reasoning: acc = acc+ = 1: 200, the whole of cognition here.
  assert results["cognition"] == pytest.approx(200.0)


# ---------------------------------------------------------------------------------------------------------------
# MMMU: mmmu/utils/eval_utils.py.
# ---------------------------------------------------------------------------------------------------------------

_MMMU_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _mmmu_parquet(path, rows):
  """MMMU's parquet columns as released on the Hub, images as {bytes, path} structs."""
  columns = {name: [row.get(name, "") for row in rows]
             for name in ("id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty",
                          "question_type", "subfield")}
  table = pa.table({**columns, **{f"image_{k}": pa.array([row.get(f"image_{k}") for row in rows], _MMMU_IMAGE)
                                  for k in range(1, 8)}})
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, path)
  return path


def _mmmu_rows():
  return [
      {"id": "validation_Art_Theory_1", "question": "<image 1> Which art movement is this?",
       "options": "['Cubism', 'Fauvism', 'Dada', 'Pop art']", "answer": "B", "question_type": "multiple-choice",
       "image_1": {"bytes": _png_bytes(11), "path": "a.png"}},
      {"id": "validation_Art_Theory_2", "question": "Which picture shows a still life?",
       "options": "['<image 2>', '<image 1>']", "answer": "A", "question_type": "multiple-choice",
       "image_1": {"bytes": _png_bytes(21), "path": "b.png"}, "image_2": {"bytes": _png_bytes(22), "path": "c.png"}},
      {"id": "validation_Math_15", "question": "<image 1> What is x?", "options": "[]",
       "answer": "['24/7', '3.429']", "question_type": "open", "image_1": {"bytes": _png_bytes(31), "path": "d.png"}},
  ]


def test_mmmu_reads_the_parquet_release(tmp_path):
  _mmmu_parquet(tmp_path / "MMMU" / "Art_Theory" / "validation-00000-of-00001.parquet", _mmmu_rows()[:2])
  _mmmu_parquet(tmp_path / "MMMU" / "Math" / "validation-00000-of-00001.parquet", _mmmu_rows()[2:])
  _mmmu_parquet(tmp_path / "MMMU" / "Math" / "dev-00000-of-00001.parquet", _mmmu_rows()[2:])  # not validation
  _, samples = _listed(f"mmmu:{tmp_path / 'MMMU'}")
  assert [s.id for s in samples] == ["validation_Art_Theory_1", "validation_Art_Theory_2", "validation_Math_15"]
  # construct_prompt with configs/llava1.5.yaml: "(A) option\n" lines, then a blank line and the instruction.
  assert samples[0].prompt == ("<image 1> Which art movement is this?\n\n(A) Cubism\n(B) Fauvism\n(C) Dada\n"
                               f"(D) Pop art\n\n{LETTER_ANSWER}")
  assert samples[2].prompt == f"<image 1> What is x?\n\n{SHORT_ANSWER}"
  # Several images a question, in the order of their numbers, wherever the question refers to them.
  assert [_levels(s) for s in samples] == [[11], [21, 22], [31]]
  assert [s.group for s in samples] == ["Art_Theory", "Art_Theory", "Math"]


def test_mmmu_multiple_choice_follows_parse_multi_choice_response():
  options = ["Cubism", "Fauvism", "Dada", "Pop art"]

  def pick(response):
    return field_metrics.mmmu_multiple_choice(response, options, random.Random(0))
  assert pick("(B) Fauvism") == "B"  # "(B)" found
  assert pick("The answer is C.") == "C"  # the "." stripped off the end, then " C " found
  assert pick("A is tempting, but B") == "B"  # " A " and " B ": the last found (rfind) wins
  assert pick("(A) looks right, not (B); so (A)") == "A"  # bracketed: (A) occurs last
  assert pick("I would say it is clearly pop art here") == "D"  # over 5 words: an option's text, any case
  # No candidate: a letter drawn from the generator, as MMMU draws from `random` seeded 42.
  assert field_metrics.mmmu_multiple_choice("Hmm", options, random.Random(42)) == random.Random(42).choice(
      ["A", "B", "C", "D"])


def test_mmmu_open_answers_follow_parse_open_response_and_eval_open():
  gold = field_metrics.mmmu_gold_answers("['24/7', '3.429']")
  assert gold == ["24/7", "3.429"]  # MMMU's list of answers written in one string
  # "The answer is 3.429." -> "the answer is 3.429"; the shortest tail after an indicator: "3.429" (after "is ");
  # its number 3.429 rounds to 3.43, as does the reference 3.429.
  assert 3.43 in field_metrics.mmmu_open_answers("The answer is 3.429.")
  assert field_metrics.mmmu_open_correct(gold, "The answer is 3.429.")
  # "It is 24/7": the tail "24/7" holds the reference text '24/7'.
  assert field_metrics.mmmu_open_correct(gold, "It is 24/7")
  assert not field_metrics.mmmu_open_correct(gold, "It is 3.5")  # 3.5 != 3.43, '24/7' not in '3.5'
  # A one-letter reference 'a' is looked for as " a" or "a ": inside a word it does not count.
  assert field_metrics.mmmu_open_correct(["a"], "the letter a")
  assert not field_metrics.mmmu_open_correct(["a"], "banana")
  # Numbers: commas dropped, rounded to 2 decimals: "1,000.004" is 1000.0.
  assert field_metrics.mmmu_open_correct(["1000"], "so the total = 1,000.004")


def test_mmmu_score_by_hand(tmp_path):
  benchmark, samples = _listed(f"mmmu:{_mmmu_parquet(tmp_path / 'v.parquet', _mmmu_rows())}")
  results = benchmark.score(samples, ["(B)", "B", "The answer is 3.429."])  # right, wrong (A), right
  assert results["accuracy"] == pytest.approx(2 / 3)
  assert results["accuracy/Art_Theory"] == 0.5 and results["accuracy/Math"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA: LLaVA's eval_science_qa.py, ScienceQA's tools/evaluate_acc.py.
# ---------------------------------------------------------------------------------------------------------------


def _problem(question, choices, answer, hint, image, subject, grade, split="test"):
  return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
          "task": "closed choice", "grade": grade, "subject": subject, "topic": "t", "category": "c",
          "skill": "s", "lecture": "", "solution": "", "split": split}


def _scienceqa_files(tmp_path):
  problems = {
      "5": _problem("Which animal's feet are also adapted for swimming?", ["duck", "cat"], 0,
                    "Ducks live near water.", "image.png", "natural science", "grade3"),
      "9": _problem("Which word is a noun?", ["run", "table", "blue"], 1, "", None, "language science", "grade8"),
      "12": _problem("Which state is farthest north?", ["Ohio", "Texas"], 0, "", "image.png", "social science",
                     "grade5"),
      "1": _problem("A train question", ["a", "b"], 0, "", None, "natural science", "grade2", split="train"),
  }
  (tmp_path / "problems.json").write_text(json.dumps(problems))
  (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["1"], "val": [], "test": ["5", "9", "12"]}))
  _png(tmp_path / "images" / "test" / "5" / "image.png", 50)
  _png(tmp_path / "images" / "test" / "12" / "image.png", 60)
  return f"scienceqa:{tmp_path / 'problems.json'}:{tmp_path / 'pid_splits.json'}:{tmp_path / 'images' / 'test'}"


def test_scienceqa_reads_problems_and_splits(tmp_path):
  _, samples = _listed(_scienceqa_files(tmp_path))
  assert [s.id for s in samples] == ["5", "9", "12"]
  # LLaVA's CQM-A prompt: "Context: <hint>" (only when there is one), the question, lettered options.
  assert samples[0].prompt == ("Context: Ducks live near water.\nWhich animal's feet are also adapted for "
                               f"swimming?\nA. duck\nB. cat\n{LETTER_ANSWER}")
  assert samples[1].prompt == f"Which word is a noun?\nA. run\nB. table\nC. blue\n{LETTER_ANSWER}"
  assert [_levels(s) for s in samples] == [[50], [], [60]]  # no image: the question is asked alone
  assert samples[1].target[:3] == ("B", 1, 3)


def test_scienceqa_choice_and_breakdowns_by_hand(tmp_path):
  # eval_science_qa.py: a bare letter; "X. " first; one "The answer is X." (the '.' any character); else FAILED.
  assert field_metrics.scienceqa_choice("B", 3) == 1
  assert field_metrics.scienceqa_choice("A. duck", 2) == 0
  assert field_metrics.scienceqa_choice("Well. The answer is C!", 3) == 2
  assert field_metrics.scienceqa_choice("The answer is C", 3) == -1  # nothing after the letter: no match
  assert field_metrics.scienceqa_choice("C", 2) == -1  # a letter past the options
  assert field_metrics.scienceqa_choice("I pick B", 2) == -1
  benchmark, samples = _listed(_scienceqa_files(tmp_path))
  results = benchmark.score(samples, ["A", "The answer is B.", "B"])  # right, right, wrong
  assert results["accuracy"] == pytest.approx(2 / 3)
  # evaluate_acc.py's groups: has_image = {5, 12}: 1/2; has_text (a hint) = {5}: 1; no_context (neither) = {9}: 1;
  # grade 1-6 = {5 (grade3), 12 (grade5)}: 1/2; grade 7-12 = {9}: 1.
  assert results["accuracy/has_image"] == 0.5 and results["accuracy/has_text"] == 1.0
  assert results["accuracy/no_context"] == 1.0
  assert results["accuracy/grade_1_6"] == 0.5 and results["accuracy/grade_7_12"] == 1.0
  assert results["accuracy/natural"] == 1.0 and results["accuracy/social"] == 0.0


class _ScriptedModel:
  """Answers by the prompt; records how many images each question showed."""

  def __init__(self, answers):
    self.answers, self.shown = answers, {}

  def fingerprint(self):
    return {"source": "scripted", "digest": str(id(self))}

  def chat_batch(self, conversations, images, max_new_tokens):
    prompts = [conversation[0]["content"][-1]["text"] for conversation in conversations]
    for conversation, prompt, row in zip(conversations, prompts, images):
      assert [part["type"] for part in conversation[0]["content"]] == ["image"] * len(row) + ["text"]
      self.shown[prompt.split("\n")[0]] = [int(image.mean()) for image in row]
    return [next(answer for start, answer in self.answers.items() if prompt.startswith(start)) for prompt in prompts]


def test_scienceqa_and_mmmu_through_the_harness(tmp_path):
  science = _scienceqa_files(tmp_path)
  mmmu = f"mmmu:{_mmmu_parquet(tmp_path / 'v.parquet', _mmmu_rows())}"
  model = _ScriptedModel({"Context: Ducks": "A", "Which word": "The answer is B.", "Which state": "B",
                          "<image 1> Which art": "(B)", "Which picture": "B", "<image 1> What is x": "It is 24/7"})
  results = harness.evaluate(model, [science, mmmu], str(tmp_path / "out"), "", batch_size=2)
  assert results["scienceqa"]["accuracy"] == pytest.approx(2 / 3) and results["scienceqa"]["accuracy/has_image"] == 0.5
  assert results["mmmu"]["accuracy"] == pytest.approx(2 / 3)
  # A question without an image is asked alone; an MMMU question shows every image it refers to.
  assert model.shown["Which word is a noun?"] == [] and model.shown["Which picture shows a still life?"] == [21, 22]


# ---------------------------------------------------------------------------------------------------------------
# TextVQA (m4c_evaluator.py) and GQA (eval.py).
# ---------------------------------------------------------------------------------------------------------------


def _textvqa_entry(question_id, image_id, question, answers):
  return {"question": question, "image_id": image_id, "image_classes": ["Poster"],
          "flickr_original_url": "https://example.org/a.jpg", "flickr_300k_url": "https://example.org/b.jpg",
          "image_width": 8, "image_height": 6, "answers": answers, "question_tokens": question.split(),
          "question_id": question_id, "set_name": "val"}


def test_textvqa_reads_the_release_and_scores_as_m4c(tmp_path):
  data = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
      _textvqa_entry(34602, "003a8ae2ef43b901", "what brand is the drink?", ["Coca Cola"] * 10),
      _textvqa_entry(34603, "00685bc495504d61", "what phone is this?", ["nokia"] * 2 + ["samsung"] * 8)]}
  (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
  _png(tmp_path / "train_images" / "003a8ae2ef43b901.jpg", 70)
  _png(tmp_path / "train_images" / "00685bc495504d61.jpg", 80)
  benchmark, samples = _listed(f"textvqa:{tmp_path / 'TextVQA_0.5.1_val.json'}:{tmp_path / 'train_images'}")
  assert [s.id for s in samples] == ["34602", "34603"]
  assert samples[0].prompt == f"what brand is the drink?\n{SHORT_ANSWER}"
  assert [_levels(s) for s in samples] == [[70], [80]]
  # Unanimous "Coca Cola", answered "coca cola": MMF lowercases both, so each leave-one-out subset holds 9
  # matches: min(1, 9/3) = 1. (vqaEval.py would compare the unanimous answers unnormalized: 0.)
  # "Nokia." -> "nokia", 2 of 10: leaving out a "nokia" leaves 1 match (1/3), a "samsung" 2 (2/3):
  # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  results = benchmark.score(samples, ["coca cola", "Nokia."])
  assert results["accuracy"] == pytest.approx((1.0 + 0.6) / 2)
  assert field_metrics.textvqa_accuracy("mcdonald's", ["McDonald's"] * 10) == 1.0  # both "mcdonald 's"
  assert field_metrics.textvqa_accuracy("pepsi", ["Coca Cola"] * 10) == 0.0


def test_gqa_reads_balanced_questions_and_scores_exact_match(tmp_path):
  def question(image_id, text, answer, structural, semantic, balanced=True):
    return {"semantic": [], "entailed": [], "equivalent": [], "question": text, "imageId": image_id,
            "isBalanced": balanced, "groups": {"global": None, "local": "10c-color"}, "answer": answer,
            "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"structural": structural, "semantic": semantic, "detailed": "x"}, "fullAnswer": "."}
  questions = {"20968379": question("n288870", "Is the sky blue?", "yes", "verify", "attr"),
               "201640614": question("n161313", "What color is the car?", "red", "query", "attr"),
               "20968380": question("n288870", "Who is riding?", "man", "query", "rel"),
               "999": question("n288870", "Unbalanced?", "no", "verify", "obj", balanced=False)}
  (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(questions))
  _png(tmp_path / "images" / "n288870.jpg", 90)
  _png(tmp_path / "images" / "n161313.jpg", 100)
  benchmark, samples = _listed(f"gqa:{tmp_path / 'testdev_balanced_questions.json'}:{tmp_path / 'images'}")
  assert [s.id for s in samples] == ["20968379", "201640614", "20968380"]  # the unbalanced one is not asked
  assert samples[1].prompt == f"What color is the car?\n{SHORT_ANSWER}"
  assert [_levels(s) for s in samples] == [[90], [100], [90]]
  # LLaVA: strip, drop trailing '.', lowercase; eval.py: equal or not. "Yes." -> yes; "Red" -> red;
  # "the man" != "man".
  results = benchmark.score(samples, ["Yes.", "Red", "the man"])
  assert results["accuracy"] == pytest.approx(2 / 3)
  assert results["accuracy/binary"] == 1.0 and results["accuracy/open"] == 0.5
  assert results["accuracy/structural/query"] == 0.5 and results["accuracy/semantic/rel"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# RefCOCO-style grounding: accuracy@0.5 of a box written as text.
# ---------------------------------------------------------------------------------------------------------------


def _refcoco_file(tmp_path):
  rows = [{"image": "coco/train2014/COCO_train2014_000000580957.jpg", "sent": "the left dog",
           "bbox": [10, 5, 20, 15], "height": 20, "width": 40},
          {"image": "coco/train2014/COCO_train2014_000000580957.jpg", "sent": "the right dog",
           "bbox": [10, 5, 20, 15], "height": 20, "width": 40}]
  (tmp_path / "refcoco_val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  _png(tmp_path / "data" / "coco" / "train2014" / "COCO_train2014_000000580957.jpg", 110, size=(40, 20))
  return f"{tmp_path / 'refcoco_val.jsonl'}:{tmp_path / 'data'}"


@pytest.mark.parametrize("coordinates, right_box", [
    # LLaVA-1.5's square: the 40x20 image padded to 40x40, 10 rows above: y = 0.375 * 40 - 10 = 5.
    ("square", "[0.25, 0.375, 0.5, 0.625]"),
    ("unit", "[0.25, 0.25, 0.5, 0.75]"),  # fractions of width 40 and height 20
    ("pixels", "The box is [10, 5, 20, 15]."),
])
def test_refcoco_boxes_in_each_coordinate_system(tmp_path, coordinates, right_box):
  benchmark, samples = _listed(f"refcoco:{_refcoco_file(tmp_path)}:{coordinates}")
  assert samples[0].prompt == ("Please provide the bounding box coordinate of the region this sentence describes: "
                               "the left dog.")
  assert [_levels(s) for s in samples] == [[110], [110]] and samples[0].target[0] == (10, 5, 20, 15)
  assert benchmark.score(samples, [right_box, "no box"])["accuracy"] == 0.5  # no box: [0, 0, 0, 0], IoU 0


def test_refcoco_iou_of_exactly_a_half_counts(tmp_path):
  benchmark, samples = _listed(f"refcoco:{_refcoco_file(tmp_path)}:pixels")
  # [10, 5, 20, 10] inside [10, 5, 20, 15]: intersection 50, union 100: IoU 0.5, and `iou >= 0.5` counts it.
  assert benchmark.score(samples, ["[10, 5, 20, 10]", "[10, 5, 20, 9]"])["accuracy"] == 0.5
  with pytest.raises(ValueError, match=r"box coordinates 'thousand'; use one of pixels, unit, square"):
    registry.get(f"refcoco:{_refcoco_file(tmp_path)}:thousand")


# ---------------------------------------------------------------------------------------------------------------
# DocVQA (ANLS), ChartQA (relaxed accuracy), OCRBench.
# ---------------------------------------------------------------------------------------------------------------


def test_anls_follows_the_rrc_script():
  # Per answer: edit distance of the lowercased, whitespace-collapsed texts over the longer raw text.
  assert field_metrics.anls("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0  # equal once lowercased
  assert field_metrics.anls("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)  # one edit in 8 characters
  # "denver" -> "denver broncos": 8 insertions over 14 characters: 1 - 8/14 = 0.43 < 0.5: 0.
  assert field_metrics.anls("Denver", ["Denver Broncos"]) == 0.0
  # The script's quirk: the length is the raw text's. "a      c" collapses to "a c", 2 edits from "ab", but the
  # length is 8 (not 3): 1 - 2/8 = 0.75 where 1 - 2/3 would fall under the threshold.
  assert field_metrics.anls("a      c", ["ab"]) == pytest.approx(0.75)
  assert field_metrics.anls("", [""]) == 1.0  # both empty: distance 0
  assert field_metrics.edit_distance("kitten", "sitting") == 3


def test_docvqa_reads_the_release(tmp_path):
  data = {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0", "data": [
      {"questionId": 337, "question": "what is the date mentioned in this letter?",
       "question_types": ["handwritten", "form"], "image": "documents/xnbl0037_1.png", "docId": 279,
       "ucsf_document_id": "xnbl0037", "ucsf_document_page_no": "1", "answers": ["1/8/93"], "data_split": "val"},
      {"questionId": 338, "question": "who is the sender?", "question_types": ["form"],
       "image": "documents/pybv0228_81.png", "docId": 280, "ucsf_document_id": "pybv0228",
       "ucsf_document_page_no": "81", "answers": ["Dear Dr. Lobo", "Dr. Lobo"], "data_split": "val"}]}
  (tmp_path / "val_v1.0.json").write_text(json.dumps(data))
  _png(tmp_path / "val" / "documents" / "xnbl0037_1.png", 120)
  _png(tmp_path / "val" / "documents" / "pybv0228_81.png", 130)
  benchmark, samples = _listed(f"docvqa:{tmp_path / 'val_v1.0.json'}:{tmp_path / 'val'}")
  assert [s.id for s in samples] == ["337", "338"] and [_levels(s) for s in samples] == [[120], [130]]
  assert samples[0].prompt == f"what is the date mentioned in this letter?\n{SHORT_ANSWER}"
  # 1/8/92: one edit in 6 characters: 5/6; " Dr. Lobo\n": stripped, equal: 1. ANLS = (5/6 + 1) / 2.
  assert benchmark.score(samples, ["1/8/92", " Dr. Lobo\n"])["anls"] == pytest.approx((5 / 6 + 1) / 2)


def test_relaxed_correctness_follows_pix2struct():
  assert field_metrics.relaxed_correctness("12", "12.5")  # |12.5 - 12| / 12 = 4.2% <= 5%
  assert not field_metrics.relaxed_correctness("12", "12.7")  # 5.8%
  assert field_metrics.relaxed_correctness("50%", "0.5")  # '50%' is 0.5
  assert field_metrics.relaxed_correctness("0", "0")  # target 0: compared as text
  assert not field_metrics.relaxed_correctness("0", "0.0")
  assert field_metrics.relaxed_correctness("Yes", "yes")  # text: equal ignoring case
  assert not field_metrics.relaxed_correctness("1,000", "1000")  # '1,000' is no float: text, unequal


def test_chartqa_reads_both_splits(tmp_path):
  (tmp_path / "test_human.json").write_text(json.dumps([
      {"imgname": "41699051005347.png", "query": "How many bars are there?", "label": "12"},
      {"imgname": "multi_col_60.png", "query": "Which country is highest?", "label": "Brazil"}]))
  (tmp_path / "test_augmented.json").write_text(json.dumps([
      {"imgname": "two_col_1.png", "query": "What share is shown?", "label": "50%"}]))
  for value, name in [(140, "41699051005347.png"), (150, "multi_col_60.png"), (160, "two_col_1.png")]:
    _png(tmp_path / "png" / name, value)
  spec = f"chartqa:{tmp_path / 'test_human.json'}:{tmp_path / 'test_augmented.json'}:{tmp_path / 'png'}"
  benchmark, samples = _listed(spec)
  assert [s.id for s in samples] == ["human/0", "human/1", "augmented/0"]
  assert [_levels(s) for s in samples] == [[140], [150], [160]]
  assert samples[1].prompt == f"Which country is highest?\n{SHORT_ANSWER}" and samples[2].target == "50%"
  results = benchmark.score(samples, ["12.5", "Chile", "0.51"])  # right (4.2%), wrong, right (2%)
  assert results["relaxed_accuracy"] == pytest.approx(2 / 3)
  assert results["relaxed_accuracy/human"] == 0.5 and results["relaxed_accuracy/augmented"] == 1.0
  with pytest.raises(ValueError, match=r"are not one file a split: two are ChartQA split 'human'"):
    registry.get(f"chartqa:{tmp_path / 'test_human.json'}:{tmp_path / 'test_human.json'}:{tmp_path / 'png'}")


def test_ocrbench_match_and_score_follow_its_script(tmp_path):
  entries = [
      {"dataset_name": "IIIT5K", "id": 2843, "image_path": "IIIT5K/test/918_1.png",
       "question": "what is written in the image?", "answers": "CENTRE", "type": "Regular Text Recognition"},
      {"dataset_name": "ctw", "id": 54, "image_path": "ctw/imgs/000000055.jpg",
       "question": "what is written in the image?", "answers": ["ANTONIOS", "ANTONIO'S"],
       "type": "Irregular Text Recognition"},
      {"dataset_name": "HME100k", "id": 23956, "image_path": "HME100K/test/test_images/test_29196.jpg",
       "question": "Please write out the expression of the formula in the image using LaTeX format.",
       "answers": "B a = C H = \\frac { 9 - 1 } { 2 } = 4\n",
       "type": "Handwritten Mathematical Expression Recognition"},
      {"dataset_name": "docVQA", "id": 54, "image_path": "docVQA/val/x.png", "question": "which year?",
       "answers": ["1990"], "type": "Doc-oriented VQA"}]
  (tmp_path / "OCRBench.json").write_text(json.dumps(entries))
  for value, entry in zip((170, 180, 190, 200), entries):
    _png(tmp_path / "OCRBench_Images" / entry["image_path"], value)
  benchmark, samples = _listed(f"ocrbench:{tmp_path / 'OCRBench.json'}:{tmp_path / 'OCRBench_Images'}")
  assert [s.id for s in samples] == ["0", "1", "2", "3"]  # places: `id` repeats (54 twice here, as released)
  assert samples[0].prompt == f"what is written in the image?\n{SHORT_ANSWER}"
  assert [_levels(s) for s in samples] == [[170], [180], [190], [200]]
  # IIIT5K: "centre" in "the word is centre." (lowercased); ctw: "antonio's" in "antonio's";
  # HME100k: spaces removed, case kept: "Ba=CH=\frac{9-1}{2}=4" in "$Ba=CH=\frac{9-1}{2}=4$"; docVQA: no.
  answers = ["The word is CENTRE.", "Antonio's", "$Ba = CH = \\frac{9-1}{2} = 4$", "1991"]
  results = benchmark.score(samples, answers)
  assert results["score"] == 3.0 and results["score/Text Recognition"] == 2.0
  assert results["score/Handwritten Mathematical Expression Recognition"] == 1.0
  assert results["score/Doc-oriented VQA"] == 0.0
  assert not field_metrics.ocrbench_correct("$ba=ch=\\frac{9-1}{2}=4$", entries[2]["answers"], "HME100k")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one error naming the file, the row and the field.
# ---------------------------------------------------------------------------------------------------------------


def test_an_unknown_kind_lists_the_field_kinds(tmp_path):
  with pytest.raises(ValueError, match=r"unknown file kind 'seedbench'.*mme:MME_DIR.*ocrbench:JSON:IMAGE_DIR"):
    registry.get(f"seedbench:{tmp_path}")


def test_a_missing_field_names_the_file_the_row_and_the_field(tmp_path):
  data = {"data": [_textvqa_entry(1, "a", "q?", ["x"] * 10), {"question_id": 2, "question": "q?", "image_id": "a"}]}
  (tmp_path / "t.json").write_text(json.dumps(data))
  _png(tmp_path / "a.jpg", 1)
  with pytest.raises(ValueError, match=r"t\.json, entry 1: no 'answers'$"):
    _listed(f"textvqa:{tmp_path / 't.json'}:{tmp_path}")


@pytest.mark.parametrize("kind, write, message", [
    ("refcoco", lambda p: p.write_text('{"image": "a.jpg", "sent": "s", "bbox": [1, 2, 3, 4], "width": 8, '
                                       '"height": 6}\n{"image": "a.jpg", "sent": "s", "bbox": [1, 2, 3], '
                                       '"width": 8, "height": 6}\n'),
     r"f, line 2: 'bbox' is \[1, 2, 3\], not \[x0, y0, x1, y1\]"),
    ("refcoco", lambda p: p.write_text('{"image": "a.jpg", "sent": "s", "bbox": [1, 2, 3, 4], "height": 6}\n'),
     r"f, line 1: no 'width'"),
    ("gqa", lambda p: p.write_text(json.dumps({"7": {"imageId": "a", "question": "q", "answer": 3}})),
     r"f, question '7': 'answer' is 3, not a string"),
    ("docvqa", lambda p: p.write_text(json.dumps({"data": [{"questionId": 1, "question": "q", "image": "a.jpg",
                                                            "answers": []}]})),
     r"f, entry 0: 'answers' is \[\], not a non-empty list of strings"),
    ("ocrbench", lambda p: p.write_text(json.dumps([{"dataset_name": "x", "id": 1, "image_path": "a.jpg",
                                                     "question": "q", "answers": 5, "type": "t"}])),
     r"f, entry 0: 'answers' is 5, not an answer or a list of answers"),
    ("chartqa", lambda p: p.write_text(json.dumps([{"imgname": "a.jpg", "query": "q"}])), r"f, entry 0: no 'label'"),
    ("textvqa", lambda p: p.write_text('{"data": [oops]}'), r"f: not valid JSON"),
])
def test_a_malformed_row_names_the_file_the_row_and_the_field(tmp_path, kind, write, message):
  write(tmp_path / "f")
  _png(tmp_path / "a.jpg", 1)
  with pytest.raises(ValueError, match=message):
    _listed(f"{kind}:{tmp_path / 'f'}:{tmp_path}")


def test_malformed_mme_mmmu_and_scienceqa_rows(tmp_path):
  root = _mme_dir(tmp_path)
  (root / "count").mkdir()
  _png(root / "count" / "1.jpg", 1)
  (root / "count" / "1.txt").write_text("How many? Please answer yes or no.\tYes\nIs it two?\tMaybe\n")
  with pytest.raises(ValueError, match=r"count/1\.txt, line 2: the answer field is 'Maybe'"):
    _listed(f"mme:{root}")
  (root / "count" / "1.txt").write_text("How many? Please answer yes or no.\tYes\n")
  with pytest.raises(ValueError, match=r"count/1\.txt: 1 questions; MME asks two about each image"):
    _listed(f"mme:{root}")

  rows = _mmmu_rows()
  rows[1]["options"] = "A or B"
  path = _mmmu_parquet(tmp_path / "m.parquet", rows)
  with pytest.raises(ValueError, match=r"m\.parquet, row 1: 'options' is 'A or B', not a Python list of strings"):
    _listed(f"mmmu:{path}")
  rows = _mmmu_rows()
  del rows[0]["image_1"]
  path = _mmmu_parquet(tmp_path / "m.parquet", rows)
  with pytest.raises(ValueError, match=r"m\.parquet, row 0: 'image_1' is empty, and the question shows <image 1>"):
    _listed(f"mmmu:{path}")
  pq.write_table(pa.table({"id": ["x"]}), tmp_path / "m.parquet")
  with pytest.raises(ValueError, match=r"m\.parquet: no 'question' column"):
    _listed(f"mmmu:{tmp_path / 'm.parquet'}")

  spec = _scienceqa_files(tmp_path)
  problems = json.loads((tmp_path / "problems.json").read_text())
  problems["9"]["answer"] = 3
  (tmp_path / "problems.json").write_text(json.dumps(problems))
  with pytest.raises(ValueError, match=r"problems\.json, problem '9': 'answer' is 3, not an index of its 3"):
    _listed(spec)
  with pytest.raises(ValueError, match=r"pid_splits\.json: no 'minitest'"):
    _listed(f"{spec}:minitest")


def test_a_missing_image_names_the_row(tmp_path):
  (tmp_path / "OCRBench.json").write_text(json.dumps([{"dataset_name": "x", "id": 1, "image_path": "gone.png",
                                                        "question": "q", "answers": "a", "type": "t"}]))
  with pytest.raises(FileNotFoundError, match=r"OCRBench\.json, entry 0: the image .*gone\.png does not exist"):
    _listed(f"ocrbench:{tmp_path / 'OCRBench.json'}:{tmp_path}")


def test_every_field_kind_is_registered():
  assert {"mme", "mmmu", "scienceqa", "textvqa", "gqa", "refcoco", "docvqa", "chartqa", "ocrbench"} <= set(
      registry.KINDS)
  assert exam_benchmarks.KINDS["scienceqa"].usage == "PROBLEMS_JSON:PID_SPLITS_JSON:IMAGE_DIR[:SPLIT]"
