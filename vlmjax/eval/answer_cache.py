"""Answers kept beside results.json as they come, tied to what made them.

    predictions/<benchmark>.jsonl                one JSON row per answer: id, prompt, answer, target, group
    predictions/<benchmark>.fingerprint.json     what made them (`harness.fingerprint`)
    predictions/<benchmark>.judge.jsonl          a judge's verdicts on some of them, with their own fingerprint

A file is appended to as answers come, so a killed evaluation continues where it stopped; its fingerprint is
written before the first row, so the rows always belong to it.
"""

import json
import logging
import os
from typing import Any


def read(path: str) -> dict[str, Any]:
  """{sample id: its row's "answer"} of an earlier, maybe killed, evaluation (or a judge's verdicts). A last line
  cut off mid-write is dropped (its sample is asked again); a bad line anywhere else is an error naming the file
  and the line."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = f.read().splitlines()
  answers = {}
  for number, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
      answers[row["id"]] = row["answer"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
      if number < len(lines):
        raise ValueError(f"{path}, line {number}: not a prediction row ({error})") from error
  return answers


def fingerprint_of(path: str) -> dict | None:
  """The fingerprint kept beside an answers file (`<name>.jsonl` -> `<name>.fingerprint.json`), or None."""
  fingerprint_path = path.removesuffix(".jsonl") + ".fingerprint.json"
  if not os.path.exists(fingerprint_path):
    return None
  with open(fingerprint_path) as f:
    return json.load(f)


def rows_made_by(path: str, expected: dict) -> dict[str, Any]:
  """The answers in `path` (`read`) if the fingerprint beside it is `expected`; otherwise none (the file is started
  anew and the fingerprint written first, so a kill at any point leaves answers that match the fingerprint)."""
  found = fingerprint_of(path)
  if found == expected:
    return read(path)
  if os.path.exists(path):
    logging.warning("%s: answers of another model or setting (%s), not of this one (%s): answering anew", path,
                    (found or {}).get("model", "no fingerprint"), expected.get("model"))
    os.remove(path)
  fingerprint_path = path.removesuffix(".jsonl") + ".fingerprint.json"
  temporary = fingerprint_path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(expected, f, indent=1)
  os.replace(temporary, fingerprint_path)
  return {}
