"""MMBench as VLMEvalKit scores it: TSV files in exactly VLMEvalKit's format, answered by a scripted model, scored
against values worked out by hand from VLMEvalKit's own rules (open-compass/VLMEvalKit at e8e78f0:
vlmeval/tools.py CIRCULAR, vlmeval/dataset/utils/multiple_choice.py mcq_circular_eval and report_acc,
vlmeval/utils/matching_util.py can_infer)."""

import base64
import csv
import io

import numpy as np
import pytest
from PIL import Image

from vlmjax.eval import harness, mmbench, registry

HEADER = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split")
COLOURS = {1: 10, 2: 60, 3: 110, 4: 160, 5: 210}  # each question's image, one grey level each


def _base64_png(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


IMAGES = {index: _base64_png(value) for index, value in COLOURS.items()}

# The questions, one row each (index, question, hint, A, B, C, D, answer, category, image, l2-category, split).
QUESTIONS = [
    (1, "Which place is shown?", "Look at the whole picture.", "a beach", "a forest", "a city", "a desert", "C",
     "image_scene", IMAGES[1], "coarse_perception", "dev"),
    (2, "Is the person happy?", "", "yes", "no", "", "", "A", "image_emotion", IMAGES[2], "coarse_perception", "dev"),
    # Option A names two option letters: CIRCULAR's abnormal_entry leaves the question unrotated.
    (3, "Which statements are true?", "", "A and B", "B only", "C only", "", "A", "logic", IMAGES[3],
     "logic_reasoning", "dev"),
    # The options are bare letters: abnormal_entry's `choices[k] in string.ascii_uppercase`, unrotated.
    (4, "Which letter is on the sign?", "", "Q", "R", "S", "", "B", "ocr", IMAGES[4],
     "finegrained_perception (instance-level)", "dev"),
    # Each option names only one letter ("A"): not abnormal, rotated.
    (5, "What is in the picture?", "", "A cat", "A dog", "", "", "B", "image_scene", IMAGES[5], "coarse_perception",
     "dev"),
]


def _copy(question, k, options, answer):
  """Copy k of a question as CIRCULAR writes it: index + k * 1e6, options and answer moved, image = g_index."""
  index, text, hint, *_, category, _, l2, split = question
  return (index + k * 1_000_000, text, hint, *options, answer, category, index, l2, split)


# The same questions circularised as `vlmutil circular` writes them (vlmeval/tools.py CIRCULAR): the 4-option
# group first (rotation 0, then 1, 2, 3), then the 2-option group, then the abnormal rows, each row with g_index
# appended. Rotation k renames option s to c_map[s] with `deque.rotate(1)` k times: for 4 options k=1 maps
# A->D, B->A, C->B, D->C, so the new A is the old B: the options become options[k:] + options[:k].
Q1, Q2, Q3, Q4, Q5 = QUESTIONS
CIRCULAR = [
    (*Q1, 1),
    _copy(Q1, 1, ("a forest", "a city", "a desert", "a beach"), "B") + (1,),
    _copy(Q1, 2, ("a city", "a desert", "a beach", "a forest"), "A") + (1,),
    _copy(Q1, 3, ("a desert", "a beach", "a forest", "a city"), "D") + (1,),
    (*Q2, 2),
    (*Q5, 5),
    _copy(Q2, 1, ("no", "yes", "", ""), "B") + (2,),
    _copy(Q5, 1, ("A dog", "A cat", "", ""), "A") + (5,),
    (*Q3, 3),
    (*Q4, 4),
]


def _write(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)  # VLMEvalKit's dump_tsv: QUOTE_ALL, NaN as ""
    writer.writerow(header)
    writer.writerows(rows)
  return path


def _files(tmp_path):
  """{variant: path}: the circularised file with its g_index column (as CIRCULAR writes it), without it (as the
  MMBench files VLMEvalKit downloads: copies found by index % 1e6), and the plain questions (rotated here)."""
  return {"g_index": _write(tmp_path / "g_index.tsv", HEADER + ("g_index",), CIRCULAR),
          "index % 1e6": _write(tmp_path / "modulo.tsv", HEADER, [row[:-1] for row in CIRCULAR]),
          "plain": _write(tmp_path / "plain.tsv", HEADER, QUESTIONS)}


class ScriptedModel:
  """Answers each prompt by `rule(question, {letter: option}, image)`."""

  def __init__(self, rule):
    self.rule = rule
    self.seen = []

  def fingerprint(self):
    return {"source": "scripted", "digest": str(id(self))}

  def chat_batch(self, conversations, images, max_new_tokens):
    replies = []
    for conversation, row in zip(conversations, images):
      prompt = conversation[0]["content"][-1]["text"]
      lines = prompt.split("\n")
      assert lines[-1] == mmbench.LETTER_ANSWER
      options = dict(line.split(". ", 1) for line in lines if line[:1] in "ABCD" and line[1:3] == ". ")
      question = next(line for line in lines if line.endswith("?"))
      self.seen.append(prompt)
      replies.append(self.rule(question, options, np.asarray(row[0])))
    return replies


def rule(question, options, image):
  index = next(q[0] for q in QUESTIONS if q[1] == question)
  assert image[0, 0, 0] == COLOURS[index]  # a copy's image cell named its question's row
  letter_of = {text: letter for letter, text in options.items()}
  if index == 1:
    return f"The answer is {letter_of['a city']}."  # right in every rotation
  if index == 2:
    return "A"  # "yes" is A only in rotation 0
  if index == 3:
    return "A"  # right: asked once, unrotated
  if index == 4:
    return "C"  # wrong: the answer is B
  return "B" if options["A"] == "A cat" else "I can not tell."  # right, then an answer no rule places


# VLMEvalKit's mcq_circular_eval with exact matching (no judge), worked by hand: the questions are the rows whose
# index equals their g_index (1, 2, 5, 3, 4); each is hit only if can_infer places every row of its group on that
# row's answer (prefetch_circular_group; a row can_infer cannot place fails the group without a judge).
#   question 1: "The answer is B." etc. -> the letter of "a city" in all four rows       hit 1
#   question 2: row 2 "A" = A; row 1000002 "A" but the answer is B ("yes" moved to B)     hit 0
#   question 5: row 5 "B" = B; row 1000005 "I can not tell." -> no letter, no option text hit 0 (1 unplaced)
#   question 3: unrotated, one row, "A" = A                                               hit 1
#   question 4: unrotated, one row, "C" != B                                              hit 0
# report_acc averages the hits over these rows: Overall 2/5; by category image_scene (1, 5) 1/2, image_emotion
# 0, logic 1, ocr 0; by l2-category coarse_perception (1, 2, 5) 1/3, logic_reasoning 1, finegrained 0.
EXPECTED = {"accuracy": 2 / 5, "accuracy/image_emotion": 0.0, "accuracy/image_scene": 0.5, "accuracy/logic": 1.0,
            "accuracy/ocr": 0.0, "accuracy/l2/coarse_perception": pytest.approx(1 / 3),
            "accuracy/l2/finegrained_perception (instance-level)": 0.0, "accuracy/l2/logic_reasoning": 1.0,
            "unplaced": 1}


@pytest.mark.parametrize("variant", ["g_index", "index % 1e6", "plain"])
def test_accuracy_equals_vlmevalkits_circular_eval(tmp_path, variant):
  path = _files(tmp_path)[variant]
  model = ScriptedModel(rule)
  results = harness.evaluate(model, [f"mmbench:{path}"], str(tmp_path / "out"), "", batch_size=5)["mmbench"]
  assert results == EXPECTED
  assert len(model.seen) == len(CIRCULAR)  # one prompt a row: copies are not rotated again
  samples = registry.get(f"mmbench:{path}").samples("")
  assert sorted(int(s.id) for s in samples) == sorted(row[0] for row in CIRCULAR)  # the plain file's copies too
  assert model.seen[0] == ("Look at the whole picture.\nWhich place is shown?\nA. a beach\nB. a forest\nC. a city\n"
                           "D. a desert\n" + mmbench.LETTER_ANSWER)


def test_the_plain_file_is_asked_as_its_circularised_file():
  plain = mmbench.circularise([{"index": q[0], "options": dict(zip("ABCD", [o for o in q[3:7] if o])),
                                "answer": q[7], "line": 2} for q in QUESTIONS], "plain.tsv")
  by_index = {row[0]: row for row in CIRCULAR}
  assert len(plain) == len(CIRCULAR)
  for row in plain:
    written = by_index[row["index"]]
    assert row["options"] == dict(zip("ABCD", [o for o in written[3:7] if o]))
    assert (row["answer"], row["g_index"]) == (written[7], written[-1])


@pytest.mark.parametrize("options, unrotated", [
    ({"A": "a beach", "B": "a forest"}, False),
    ({"A": "A cat", "B": "A dog"}, False),  # each option names one letter only
    ({"A": "C and D", "B": "yes"}, False),  # C and D are not this question's options
    ({"A": "A and B", "B": "B only"}, True),  # one option names two option letters
    ({"A": "(A), (B)", "B": "neither"}, True),  # punctuation is a space: words A, B
    ({"A": "Q", "B": "R"}, True),  # a bare letter
    ({"A": "XY", "B": "a word"}, True),  # `"XY" in string.ascii_uppercase`
])
def test_which_questions_are_rotated(options, unrotated):
  assert mmbench.unrotated(options) == unrotated


FRUIT = {"A": "apple", "B": "banana", "C": "cherry", "D": "date"}  # 21 characters of option text


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"),  # a letter alone
    ("The answer is B.", "B"),  # punctuation is a space; B is the one option letter, among the last four words
    ("(C) cherry", "C"),
    ("banana", "B"),  # no letter: the option whose text is in the answer (can_infer_text)
    ("I think it is a Banana", "B"),  # lower-cased; "I" and "a" are no option letters
    ("A or B", None),  # two letters
    ("apple or banana", None),  # two options' texts
    ("It is clearly a banana, since the fruit is long and curved.", None),  # longer than 2 x 21: not read for text
    ("B is right because it is long and curved", None),  # the one letter is not among the last four words
    ("b", None),  # a lower-case letter is not a letter
    ("The correct answer is **C**. Because A and B are wrong", "C"),  # three letters, then 'answer is X'
    ("The answer is a date", "A"),  # VLMEvalKit's 'answer is X' is case-insensitive, unbounded: "a" is A
    ("Sorry, I can't help with images of people yet.", "Z"),  # a refusal: placed on no option, scored wrong
    ("Z", "Z"),
    ("Failed to obtain answer via API", None),
])
def test_extract_follows_can_infer(answer, expected):
  assert mmbench.extract(answer, FRUIT) == expected


def test_extract_takes_option_lists():
  assert mmbench.extract("no", ["yes", "no"]) == "B"
  assert mmbench.extract("C", ["yes", "no"]) is None  # C is not one of the options


def test_score_letters_takes_a_judges_letters(tmp_path):
  samples = registry.get(f"mmbench:{_files(tmp_path)['g_index']}").samples("")
  letters = [sample.target[0] for sample in samples]  # every row placed on its answer
  assert mmbench.score_letters(samples, letters)["accuracy"] == 1.0
  letters[0] = None
  assert mmbench.score_letters(samples, letters)["unplaced"] == 1


def _bad(tmp_path, change, header=HEADER + ("g_index",)):
  rows = [list(row) for row in CIRCULAR]
  header = list(header)
  change(header, rows)
  return _write(tmp_path / "bad.tsv", header, rows)


@pytest.mark.parametrize("change, message", [
    (lambda header, rows: header.__setitem__(7, "solution"), r"line 1: no 'answer' column"),
    (lambda header, rows: rows[1].__setitem__(0, "one"), r"line 3, 'index': 'one' is not an integer"),
    (lambda header, rows: rows[2].__setitem__(7, ""), r"line 4, 'answer': empty"),
    (lambda header, rows: rows[4].__setitem__(7, "C"), r"line 6, 'answer': 'C' is not one of the option letters A, B"),
    (lambda header, rows: rows[4].__setitem__(4, "nan"), r"line 6, 'B': empty; a question needs at least two"),
    (lambda header, rows: rows[1].__setitem__(9, "9"), r"line 3, 'image': '9' is neither an image"),
    (lambda header, rows: rows[1].__setitem__(9, "2000001"), r"line 3, 'image': '2000001' is neither an image"),
    (lambda header, rows: rows[1].__setitem__(-1, 7), r"line 3, 'g_index': a copy of question 7"),
    (lambda header, rows: rows[1].__setitem__(0, 1), r"line 3, 'index': 1 is also the index of line 2"),
    (lambda header, rows: rows[3].pop(), r"line 5: 12 fields where the header has 13"),
])
def test_bad_input_is_one_error_naming_file_row_and_field(tmp_path, change, message):
  with pytest.raises(ValueError, match=r"bad.tsv, " + message):
    mmbench.samples(str(_bad(tmp_path, change)))


def test_bad_input_without_g_index_and_in_plain_files(tmp_path):
  orphan = (1000009, *CIRCULAR[6][1:-1])  # a copy of question 2's row, under an index whose question is 9
  path = _write(tmp_path / "bad.tsv", HEADER, [row[:-1] for row in CIRCULAR] + [orphan])
  with pytest.raises(ValueError, match=r"bad.tsv, line 12, 'index': a copy of question 9 \(its index % 1e6\)"):
    mmbench.samples(str(path))
  gap = list(Q1)
  gap[4] = ""  # option B empty, C and D not: VLMEvalKit's circular tool refuses it
  path = _write(tmp_path / "gap.tsv", HEADER, [gap])
  with pytest.raises(ValueError, match=r"gap.tsv, line 2, 'B': empty while a later option is not"):
    mmbench.samples(str(path))
