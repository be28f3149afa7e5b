"""The official scorers of the benchmarks the field reports, one small function per rule, each following the code
the benchmark's authors (or the evaluation scripts the field's numbers come from) publish:

- MME: `mme_answer`, `mme_scores` — eval_tool/calculation.py of BradyFU/Awesome-Multimodal-Large-Language-Models
  (tools/eval_tool.zip): acc and acc+ per subtask, score = 100 (acc + acc+), perception out of 2000 (10
  subtasks), cognition out of 800 (4).
- MMMU: `mmmu_multiple_choice`, `mmmu_open_answers`, `mmmu_open_correct` — mmmu/utils/eval_utils.py of
  MMMU-Benchmark/MMMU (`parse_multi_choice_response`, `parse_open_response`, `eval_open`).
- ScienceQA: `scienceqa_choice` — LLaVA's llava/eval/eval_science_qa.py (the letter parsing every LLaVA-style
  number comes from); the breakdowns are lupantech/ScienceQA's tools/evaluate_acc.py (in field_benchmarks.py).
- TextVQA: `textvqa_accuracy` — LLaVA's llava/eval/m4c_evaluator.py (`TextVQAAccuracyEvaluator`, from MMF).
- GQA: `gqa_prediction` — LLaVA's scripts/convert_gqa_for_eval.py; eval.py of GQA then compares exactly.
- DocVQA: `anls` — the ANLS of the RRC's DocVQA/InfographicVQA evaluation script (threshold 0.5), as Qwen-VL's
  eval_mm and InternVL's eval scripts copy it; the RRC does not publish it on GitHub.
- ChartQA: `relaxed_correctness` — pix2struct/metrics.py of google-research/pix2struct (5% relative tolerance).
- OCRBench: `ocrbench_correct`, `ocrbench_scores` — OCRBench/scripts/LLaVA1_5.py of Yuliang-Liu/MultimodalOCR.
- RefCOCO-style grounding: `box_in_pixels` (a box written as text, in the coordinates the model was taught);
  accuracy@0.5 is `metrics.grounding_accuracy`.
"""

import ast
import random
import re

from vlmjax.eval import metrics

# ---------------------------------------------------------------------------------------------------------------
# MME.
# ---------------------------------------------------------------------------------------------------------------

MME_SUBTASKS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def mme_answer(response: str) -> str:
  """'yes', 'no' or 'other', as calculation.py's `parse_pred_ans` reads a response: lowercased, exactly 'yes' or
  'no', else 'yes' (then 'no') found among its first four characters. The response is first put on one line
  (the eval tool's readme: delete the line breaks) and stripped (LLaVA strips its answers)."""
  text = response.strip().replace("\n", "").lower()
  if text in ("yes", "no"):
    return text
  if "yes" in text[:4]:
    return "yes"
  return "no" if "no" in text[:4] else "other"


def mme_scores(subtasks: list[str], images: list[str], responses: list[str], labels: list[str]) -> dict[str, float]:
  """MME's scores: `<subtask>/acc`, `<subtask>/acc_plus`, `<subtask>/score`, `perception` and `cognition`.

  One entry per question. subtasks: its subtask (a name of MME_SUBTASKS); images: the image it asks about (the two
  questions of an image share it); labels: 'yes' / 'no'. acc: the fraction of questions answered right (an
  'other' answer is wrong); acc_plus: the fraction of images whose questions are all answered right; score:
  100 (acc + acc_plus), at most 200. perception and cognition sum the scores of their subtasks present.
  """
  if not len(subtasks) == len(images) == len(responses) == len(labels) or not labels:
    raise ValueError(f"mme_scores needs matching non-empty lists: {len(subtasks)} subtasks, {len(images)} images, "
                     f"{len(responses)} responses, {len(labels)} labels")
  right: dict[str, list[bool]] = {}
  image_right: dict[tuple[str, str], bool] = {}
  for subtask, image, response, label in zip(subtasks, images, responses, labels):
    correct = mme_answer(response) == label.strip().lower()
    right.setdefault(subtask, []).append(correct)
    image_right[subtask, image] = image_right.get((subtask, image), True) and correct
  results = {}
  for subtask, answers in right.items():
    per_image = [correct for (name, _), correct in image_right.items() if name == subtask]
    acc, acc_plus = sum(answers) / len(answers), sum(per_image) / len(per_image)
    results.update({f"{subtask}/acc": acc, f"{subtask}/acc_plus": acc_plus, f"{subtask}/score": 100 * (acc + acc_plus)})
  for total, names in MME_SUBTASKS.items():
    results[total] = sum(results[f"{name}/score"] for name in names if name in right)
  return results


# ---------------------------------------------------------------------------------------------------------------
# MMMU (mmmu/utils/eval_utils.py).
# ---------------------------------------------------------------------------------------------------------------


def mmmu_multiple_choice(response: str, options: list[str], rng: random.Random) -> str:
  """The option letter a response picks, by `parse_multi_choice_response`.

  Trailing and leading , . ! ? ; : ' are stripped; then "(B)" anywhere, else " B " anywhere, else (responses of
  more than five words) an option's text anywhere, case-insensitive. Several candidates: the one found last in the
  response. None: a letter drawn from `rng`, as MMMU draws one from `random` seeded 42.
  """
  letters = [chr(ord("A") + i) for i in range(len(options))]
  for char in (",", ".", "!", "?", ";", ":", "'"):
    response = response.strip(char)
  response = f" {response} "
  in_brackets = [letter for letter in letters if f"({letter})" in response]
  candidates = in_brackets or [letter for letter in letters if f" {letter} " in response]
  by_text = False
  if not candidates and len(response.split()) > 5:
    candidates = [letter for letter, option in zip(letters, options) if option.lower() in response.lower()]
    by_text = True
  if not candidates:
    return rng.choice(letters)
  if len(candidates) == 1:
    return candidates[0]
  if by_text:
    starts = [response.lower().rfind(options[letters.index(letter)].lower()) for letter in candidates]
  else:
    starts = [response.rfind(f"({letter})" if in_brackets else f" {letter} ") for letter in candidates]
  return candidates[starts.index(max(starts))]  # np.argmax: the first of equal maxima


def _is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def _mmmu_normalize(text: str) -> list:
  """`normalize_str`: a number (commas dropped) rounded to 2 decimals, else the lowercased text; a one-character
  text is padded with a space on either side ([' a', 'a ']) so that it does not match inside words."""
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBER_PATTERNS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
                    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
                    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))  # 12, 1.5, .5
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def mmmu_open_answers(response: str) -> list:
  """The candidate answers `parse_open_response` reads from an open-question response (strings and floats).

  The response, lowercased and cut at sentence ends and line breaks; from each piece, the shortest tail after an
  indicator ('is ', 'so ', 'therefore ', ..., and '=' in the last piece) unless it is bare punctuation; the whole
  response if no piece has one. Then every number in those tails, and all of it normalized (`_mmmu_normalize`).
  """
  text = response.strip().strip(".").lower()
  pieces = re.split(r"\.\s(?=[A-Z])|\n", text)
  tails = []
  for index, piece in enumerate(pieces):
    indicators = _KEY_INDICATORS + (("=",) if index == len(pieces) - 1 else ())
    shortest = None
    for indicator in indicators:
      if indicator in piece:
        tail = piece.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
      tails.append(shortest)
  tails = tails or [text]
  found = tails + [number for tail in tails for pattern in _NUMBER_PATTERNS for number in pattern.findall(tail)]
  return list({value for item in found for value in _mmmu_normalize(item)})


def mmmu_gold_answers(answer: str) -> list[str]:
  """An open question's reference answers: MMMU writes several as a Python list in one string ("['24/7',
  '3.429']"); anything else is one answer."""
  if answer.strip().startswith("["):
    try:
      parsed = ast.literal_eval(answer.strip())
    except (ValueError, SyntaxError):
      return [answer]
    if isinstance(parsed, list) and parsed and all(isinstance(item, str) for item in parsed):
      return parsed
  return [answer]


def mmmu_open_correct(answers: list[str], response: str) -> bool:
  """`eval_open`: a number read from the response equals a normalized reference number, or a normalized reference
  text occurs inside a text read from the response."""
  references = [value for answer in answers for value in _mmmu_normalize(answer)]
  for candidate in mmmu_open_answers(response):
    if isinstance(candidate, str):
      if any(isinstance(reference, str) and reference in candidate for reference in references):
        return True
    elif candidate in references:
      return True
  return False


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA, TextVQA, GQA.
# ---------------------------------------------------------------------------------------------------------------

_SCIENCEQA_LETTERS = ("A", "B", "C", "D", "E")


def scienceqa_choice(response: str, num_choices: int) -> int:
  """The option index a response picks as LLaVA's eval_science_qa.py reads it, -1 if none: the response is a
  letter, or starts with "B. ", or holds exactly one "The answer is B." (any character after the letter)."""
  text = response.strip()
  if text in _SCIENCEQA_LETTERS:
    letter = text
  elif len(text) >= 3 and text[0] in _SCIENCEQA_LETTERS and text[1:3] == ". ":
    letter = text[0]
  else:
    found = re.findall(r"The answer is ([A-Z]).", text)
    letter = found[0] if len(found) == 1 else ""
  return _SCIENCEQA_LETTERS.index(letter) if letter in _SCIENCEQA_LETTERS[:num_choices] else -1


def _evalai_answer(text: str) -> str:
  """MMF's EvalAIAnswerProcessor: lowercase, drop ',' and '?', split off "'s", then the VQA normalization.

  Its tables are vqaEval.py's but for the contractions: MMF keeps only the "...'ve" forms, so a reference "dont"
  and a prediction "don't" agree here and not in MMF (no TextVQA answer we know of turns on it)."""
  return metrics.normalize_vqa_answer(text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip())


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
  """TextVQA accuracy (`TextVQAAccuracyEvaluator`): the VQA soft score over the 10 human answers, with prediction
  and answers always normalized first (vqaEval.py compares unanimous answers unnormalized; MMF does not)."""
  return metrics.vqa_accuracy(_evalai_answer(prediction), [_evalai_answer(answer) for answer in answers])


def gqa_prediction(response: str) -> str:
  """The prediction LLaVA hands GQA's eval.py: the response stripped, trailing periods removed, lowercased; eval.py
  then counts it right only if it equals the answer exactly."""
  return response.strip().rstrip(".").lower()


# ---------------------------------------------------------------------------------------------------------------
# DocVQA (ANLS), ChartQA (relaxed accuracy), OCRBench.
# ---------------------------------------------------------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance: the fewest insertions, deletions and substitutions that turn a into b."""
  previous = list(range(len(b) + 1))
  for i, char_a in enumerate(a, 1):
    current = [i]
    for j, char_b in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
    previous = current
  return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
  """Normalized Levenshtein similarity of one prediction against its answers, as the RRC's script computes it.

  Per answer: the edit distance between the two texts lowercased with whitespace collapsed, over the longer of the
  two texts as given (before collapsing: the script's own quirk); the similarity is 1 - the smallest of those
  distances, and 0 below the threshold. ANLS is its mean over the questions.
  """
  if isinstance(answers, str) or not answers:
    raise ValueError(f"anls needs a non-empty list of answers, got {answers!r}")
  detected = " ".join(prediction.strip().lower().split())
  distances = []
  for answer in answers:
    length = max(len(answer.upper()), len(prediction.upper()))
    distance = edit_distance(" ".join(answer.strip().lower().split()), detected)
    distances.append(0.0 if length == 0 else distance / length)
  similarity = 1 - min(distances)
  return 0.0 if similarity < threshold else similarity


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA's relaxed accuracy (pix2struct `relaxed_correctness`): when both parse as numbers ('12%' is 0.12)
  and the target is not 0, right within 5% of the target; otherwise right if equal ignoring case."""

  def to_float(text: str) -> float | None:
    try:
      return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
      return None

  prediction_float, target_float = to_float(prediction), to_float(target)
  if prediction_float is not None and target_float:
    return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
  return prediction.lower() == target.lower()


OCRBENCH_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                        "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")


def ocrbench_correct(prediction: str, answers: str | list[str], dataset_name: str) -> bool:
  """OCRBench's match: an answer occurs in the prediction, both stripped with line breaks as spaces and lowercased;
  for HME100k (formulas) not lowercased but with every space removed."""

  def normalize(text: str) -> str:
    if dataset_name == "HME100k":
      return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")

  return any(normalize(answer) in normalize(prediction) for answer in ([answers] if isinstance(answers, str)
                                                                       else answers))


def ocrbench_scores(types: list[str], correct: list[bool]) -> dict[str, float]:
  """OCRBench's scores, in points (one per question right): `score` (of 1000 for the full file), `score/<type>`
  and `score/Text Recognition` (the six recognition types, of 300)."""
  results = {"score": float(sum(correct))}
  for name in sorted(set(types)):
    results[f"score/{name}"] = float(sum(right for kind, right in zip(types, correct) if kind == name))
  results["score/Text Recognition"] = float(sum(results.get(f"score/{name}", 0) for name in OCRBENCH_RECOGNITION))
  return results


# ---------------------------------------------------------------------------------------------------------------
# RefCOCO-style grounding.
# ---------------------------------------------------------------------------------------------------------------

BOX_COORDINATES = ("pixels", "unit", "square")


def box_in_pixels(box, coordinates: str, width: int, height: int) -> tuple[float, float, float, float]:
  """A box [x0, y0, x1, y1] the model wrote, in pixels of the image.

  coordinates: 'pixels' (already), 'unit' (fractions of the width and height), or 'square' (fractions of the
  image padded to a centred square, LLaVA-1.5's convention: its image processor pads before resizing, so a box it
  writes is relative to the padded square; the padding is (side - width) // 2 or (side - height) // 2).
  """
  x0, y0, x1, y1 = box
  if coordinates == "pixels":
    return x0, y0, x1, y1
  if coordinates == "unit":
    return x0 * width, y0 * height, x1 * width, y1 * height
  if coordinates == "square":
    side = max(width, height)
    dx, dy = (side - width) // 2, (side - height) // 2
    return x0 * side - dx, y0 * side - dy, x1 * side - dx, y1 * side - dy
  raise ValueError(f"box coordinates {coordinates!r}: use one of {', '.join(BOX_COORDINATES)}")
