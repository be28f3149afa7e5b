"""MMBench as VLMEvalKit scores it, from its TSV files as it ships and writes them: `mmbench:TSV`.

    registry.get("mmbench:MMBench_DEV_EN.tsv")     # results: accuracy, accuracy/<category>,
                                                   # accuracy/l2/<l2-category>, unplaced

Our own code, rule for rule after VLMEvalKit (open-compass/VLMEvalKit at e8e78f0); each piece names the function
it follows:

- Which prompts are asked. A file that already holds circular copies (a `g_index` column, or an index >= 1e6)
  is asked row by row, as it is: each row with its own options, its question `g_index` or index % 1e6
  (`formats.MmbenchQuestions`; `mcq_circular_eval` in vlmeval/dataset/utils/multiple_choice.py). A file of one
  row per question is first circularised in memory as `vlmutil circular` would write it (`CIRCULAR` in
  vlmeval/tools.py): copy k of question i has index i + k * 1e6 and options `options[k:] + options[:k]`, and a
  question whose options name option letters is left as it is (`unrotated`).
- How an answer is placed on an option: `extract` (`can_infer` in vlmeval/utils/matching_util.py).
- How a question scores: right only if every one of its rows is placed on that row's answer; an answer that
  no rule places is wrong, as VLMEvalKit scores without a judge (`prefetch_circular_group`, `exact_matching`).
  `accuracy` is over the questions, `accuracy/<category>` and `accuracy/l2/<l2-category>` over a question's
  category and l2-category columns (`report_acc`, which names l2-categories by their abbreviations: CP, FP-S...;
  we keep the names the file gives). `unplaced` counts the answers (rows, not questions) no rule could place:
  those VLMEvalKit would hand its LLM judge, were their question not already failed by a wrong placed answer.

A judge can place those afterwards: `extract(answer, options)` gives None for them; give the judge's letters to
`score_letters` in their place. The prompt is LLaVA's MMBench prompt (`mmbench_prompt`), not VLMEvalKit's.
"""

import collections
import functools
import re
import string
from typing import Mapping, Sequence

import numpy as np

from vlmjax.data import formats
from vlmjax.eval.benchmarks import Benchmark, FileKind, Sample

LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


def mmbench_prompt(question: str, hint: str, options: Sequence[str] | Mapping[str, str]) -> str:
  """LLaVA's MMBench prompt: the hint, the question, 'A. option' lines, then the instruction. options: texts
  (lettered A, B, ...) or {letter: text}."""
  if not isinstance(options, Mapping):
    options = dict(zip(string.ascii_uppercase, options))
  lines = ([hint] if hint else []) + [question] + [f"{letter}. {text}" for letter, text in options.items()]
  return "\n".join(lines + [LETTER_ANSWER])


# ---------------------------------------------------------------------------------------------------------------
# Circular copies of a file of one row per question (vlmeval/tools.py CIRCULAR).
# ---------------------------------------------------------------------------------------------------------------


def unrotated(options: Mapping[str, str]) -> bool:
  """Whether VLMEvalKit leaves a question's options in their order (`CIRCULAR`'s `abnormal_entry`): one option's
  words (letters only, everything else a space) name two or more of the option letters ("Both A and B"), or an
  option is a bare letter, or a run of them ("C", "XY": Python's `text in string.ascii_uppercase`)."""
  for text in options.values():
    words = re.sub(r"[^A-Za-z ]", " ", text).split()
    if len({word for word in words if word in options}) > 1:
      return True
  return any(text in string.ascii_uppercase for text in options.values())


def circularise(records: list[dict], path: str) -> list[dict]:
  """Each question of a file without copies, then its copies as `CIRCULAR` writes them: copy k has index
  index + k * 1e6, options `options[k:] + options[:k]` under the same letters, and the answer moved with its
  option; `unrotated` questions stay one row. Every row's `g_index` is its question's index."""
  rows = []
  for record in records:
    letters = list(record["options"])
    if letters != list(string.ascii_uppercase[:len(letters)]):
      gap = next(a for a, b in zip(string.ascii_uppercase, letters) if a != b)
      raise ValueError(f"{path}, line {record['line']}, {gap!r}: empty while a later option is not; "
                       f"VLMEvalKit's circular tool (vlmeval/tools.py CIRCULAR) takes options A, B, C... only "
                       f"without a gap")
    rows.append({**record, "g_index": record["index"]})
    if unrotated(record["options"]):
      continue
    texts, answer = list(record["options"].values()), letters.index(record["answer"])
    for k in range(1, len(letters)):
      rows.append({**record, "index": record["index"] + k * formats.MMBENCH_OFFSET, "g_index": record["index"],
                   "options": dict(zip(letters, texts[k:] + texts[:k])),
                   "answer": letters[(answer - k) % len(letters)]})
  return rows


# ---------------------------------------------------------------------------------------------------------------
# Placing an answer on an option (vlmeval/utils/matching_util.py can_infer).
# ---------------------------------------------------------------------------------------------------------------

_API_FAILURE = "Failed to obtain answer via API"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
# "The correct answer is **B**", "The answer is C." As VLMEvalKit's: A-D only, case-insensitive and without a
# word boundary, so "the answer is a cat" names A.
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _infer_option(answer: str, letters: Sequence[str]) -> str | None:
  """`can_infer_option`: the one option letter among the answer's words, if it is one of the last four words;
  'Z' for a refusal or a lone Z; else the letter of 'the (correct) answer is X'."""
  if _API_FAILURE in answer:
    return None
  if any(refusal in answer for refusal in _REFUSALS):
    return "Z"
  words = answer.translate(_SEPARATORS).split()
  named = [letter for letter in letters if letter in words]
  if len(named) == 1 and words.index(named[0]) > len(words) - 5:
    return named[0]
  if not named and "Z" in words:
    return "Z"
  match = _VERBOSE_ANSWER.search(answer)
  if match and match.group(1).upper() in letters:
    return match.group(1).upper()
  return None


def _infer_text(answer: str, options: Mapping[str, str]) -> str | None:
  """`can_infer_text`: the one option whose text is in the answer (both lower-cased); none when the answer is
  longer than twice the options' texts together."""
  answer = answer.lower()
  if len(answer) > 2 * sum(len(text) for text in options.values()):
    return None
  found = [letter for letter, text in options.items() if text.lower() in answer]
  return found[0] if len(found) == 1 else None


def extract(answer: str, options: Sequence[str] | Mapping[str, str]) -> str | None:
  """The option an answer names, by VLMEvalKit's `can_infer`: the letter (`_infer_option`), else the option's
  text (`_infer_text`). options: texts (lettered A, B, ...) or {letter: text}.

  Returns the letter; 'Z' where the answer refuses or says Z (VLMEvalKit's "none of them", scored wrong and never
  judged); None where no rule places it (VLMEvalKit would ask its LLM judge, whose reply goes through the same
  rules: a judge for vlmjax replaces these Nones and scores with `score_letters`).
  """
  if not isinstance(options, Mapping):
    options = dict(zip(string.ascii_uppercase, options))
  answer = str(answer)
  return _infer_option(answer, list(options)) or _infer_text(answer, options)


# ---------------------------------------------------------------------------------------------------------------
# CircularEval (vlmeval/dataset/utils/multiple_choice.py mcq_circular_eval, report_acc).
# ---------------------------------------------------------------------------------------------------------------


def score_letters(samples: list[Sample], letters: list[str | None]) -> dict[str, float]:
  """`accuracy` (a question is right only if each of its rows was placed on that row's answer), the same per
  category (`accuracy/<category>`) and l2-category (`accuracy/l2/<l2-category>`), and `unplaced`, the number of
  rows whose letter is None. samples: this module's; letters: the option placed for each (`extract`)."""
  right: dict[str, bool] = collections.defaultdict(lambda: True)
  kinds: dict[str, tuple[str, str]] = {}  # question -> (category, l2-category), as its own row (not a copy) says
  for sample, letter in zip(samples, letters, strict=True):
    answer, _, category, l2_category = sample.target
    right[sample.group] &= letter == answer
    if sample.id == sample.group or sample.group not in kinds:
      kinds[sample.group] = (category, l2_category)
  results = {"accuracy": float(np.mean([right[question] for question in kinds]))}
  for prefix, column in (("accuracy/", 0), ("accuracy/l2/", 1)):
    for name in sorted({kind[column] for kind in kinds.values()} - {""}):
      results[prefix + name] = float(np.mean([right[q] for q, kind in kinds.items() if kind[column] == name]))
  return {**results, "unplaced": sum(letter is None for letter in letters)}


def score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  """`score_letters` of the letters `extract` places the answers on."""
  return score_letters(samples, [extract(answer, sample.target[1]) for sample, answer in zip(samples, answers)])


def samples(path: str) -> list[Sample]:
  """One sample a row (a file without copies circularised first): id the row's index, group its question's
  (g_index), target (answer letter, {letter: option}, category, l2-category)."""
  source = formats.MmbenchQuestions(path)
  records = [{**source.annotation(i), "position": i} for i in range(len(source))]
  if not source.circular:
    records = circularise(records, path)
  return [Sample(str(row["index"]), (functools.partial(source.image, row["position"]),),
                 mmbench_prompt(row["question"], row["hint"], row["options"]),
                 (row["answer"], row["options"], row["category"], row["l2_category"]), str(row["g_index"]))
          for row in records]


def _mmbench(name: str, args: list[str]) -> Benchmark:
  (tsv,) = args
  # A judge (`vlmjax eval --judge`) places the answers `extract` leaves unplaced; its letter is then read as any.
  return Benchmark(name, lambda data_dir: samples(tsv), score, max_new_tokens=8,
                   choices=lambda sample: list(sample.target[1].values()), extract=extract)


KINDS: dict[str, FileKind] = {"mmbench": FileKind("TSV", _mmbench, 1, 1)}
