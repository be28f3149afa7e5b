"""The LLM judge: its replies parsed, its verdicts placing answers and cached, a real `vlmjax serve` as the judge
through the `openai` client, and an unreachable judge stopping `vlmjax eval` before the model loads."""

import json
import os
import socket
import subprocess
import sys

import pytest

from vlmjax.eval import harness, judge as judge_lib, registry


def test_the_spec_names_a_model_after_the_url():
  assert judge_lib.parse_spec("http://127.0.0.1:8000/v1:judge") == ("http://127.0.0.1:8000/v1", "judge")
  assert judge_lib.parse_spec("http://127.0.0.1:8000/v1") == ("http://127.0.0.1:8000/v1", None)
  assert judge_lib.parse_spec("http://127.0.0.1:8000") == ("http://127.0.0.1:8000", None)
  assert judge_lib.parse_spec("https://api.example.com/v1:gpt-4o-mini") == ("https://api.example.com/v1", "gpt-4o-mini")


@pytest.mark.parametrize("reply,letter", [("B", "B"), (" C.", "C"), ("The answer is A", "A"), ("Z", None),
                                          ("A or B", None), ("E", None), ("", None), ("dog", None)])
def test_a_choice_reply_names_one_valid_letter_or_nothing(reply, letter):
  assert judge_lib.parse_choice(reply, 4) == letter


@pytest.mark.parametrize("reply,verdict", [("yes", True), ("No.", False), ("Yes, it does", True),
                                           ("yes and no", None), ("maybe", None)])
def test_a_match_reply_is_yes_no_or_nothing(reply, verdict):
  assert judge_lib.parse_match(reply) == verdict


class ScriptedJudge:
  """Replies by a rule and counts the questions it is asked."""

  def __init__(self, reply):
    self.reply, self.asked = reply, []

  def fingerprint(self):
    return {"url": "scripted", "model": "rule"}

  def ask(self, prompt):
    self.asked.append(prompt)
    return self.reply(prompt)


def _mc_samples(tiny_shapes_dir):
  return registry.get("shapes_mc").samples(tiny_shapes_dir)[:8]


def test_the_judge_places_what_the_rules_cannot_and_is_asked_once(tiny_shapes_dir, tmp_path):
  benchmark = registry.get("shapes_mc")
  samples = _mc_samples(tiny_shapes_dir)
  # Rows 0-3 answer with their letter; rows 4-7 ramble. The judge finds the right option for rows 4 and 5 (it
  # reads the option text from its prompt), says Z for row 6 and rambles back for row 7.
  answers = [s.target[0] for s in samples[:4]] + ["hmm, hard to say"] * 4
  replies = {samples[4].id: samples[4].target[0], samples[5].id: samples[5].target[0], samples[6].id: "Z",
             samples[7].id: "I think so"}
  by_prompt = {judge_lib.choice_prompt(s.prompt, list(s.target[1]), "hmm, hard to say"): replies[s.id]
               for s in samples[4:]}
  judge = ScriptedJudge(by_prompt.__getitem__)
  path = str(tmp_path / "mc.judge.jsonl")
  made_by = {"model": {"digest": "m"}}
  judged, metrics = judge_lib.judge_answers(judge, benchmark, samples, answers, path, made_by)
  assert len(judge.asked) == 4 and metrics == {"judge/placed": 2.0}
  assert judged[:6] == [s.target[0] for s in samples[:6]] and judged[6:] == answers[6:]
  scores = benchmark.score(samples, judged)
  assert scores["unplaced"] == 2.0  # the two the judge could not place, counted
  again = ScriptedJudge(lambda prompt: pytest.fail("asked again"))
  assert judge_lib.judge_answers(again, benchmark, samples, answers, path, made_by) == (judged, metrics)
  other_model = ScriptedJudge(by_prompt.__getitem__)
  judge_lib.judge_answers(other_model, benchmark, samples, answers, path, {"model": {"digest": "n"}})
  assert len(other_model.asked) == 4  # the answers of another model: their verdicts are asked anew


def test_open_answers_are_matched_by_meaning(tiny_shapes_dir, tmp_path):
  benchmark = registry.get("shapes_vqa")
  samples = registry.get("shapes_vqa").samples(tiny_shapes_dir)[:4]
  answers = [samples[0].target[0], "crimson-ish", "dunno", "a thing"]
  judge = ScriptedJudge(lambda prompt: {"crimson-ish": "yes", "dunno": "no"}.get(
      prompt.split("Model's answer: ")[1].split("\n")[0], "perhaps"))
  _, metrics = judge_lib.judge_answers(judge, benchmark, samples, answers, str(tmp_path / "v.judge.jsonl"),
                                       {"model": None})
  assert len(judge.asked) == 3  # the exact match is not asked
  assert metrics == {"judge/accuracy": 0.5, "judge/unplaced": 1.0}


class Rambler:
  """Answers every multiple-choice prompt with text no rule can place."""

  def fingerprint(self):
    return {"source": "rambler", "digest": "0"}

  def chat_batch(self, conversations, images, max_new_tokens):
    return ["I could not say which"] * len(conversations)


def _free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_judge(tiny_vlm, tmp_path_factory, serve_process):
  """`vlmjax serve` on the tiny model, in its own process: the judge's URL."""
  from vlmjax.interop import hf
  directory = tmp_path_factory.mktemp("judge")
  checkpoint = str(directory / "tiny")
  hf.save_pretrained(checkpoint, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=1024)
  with serve_process(checkpoint, directory / "serve.log", "--slots", "4", "--model_name", "judge") as (_, port):
    yield f"http://127.0.0.1:{port}/v1"


def test_vlmjax_serve_judges_through_the_openai_client(served_judge, tiny_shapes_dir, tmp_path):
  judge = judge_lib.Judge(served_judge)
  judge.check()
  assert judge.model == "judge"  # the model the endpoint lists
  asked = []
  ask = judge.ask
  judge.ask = lambda prompt: asked.append(prompt) or ask(prompt)
  limits = {"shapes_mc": 8}
  results = harness.evaluate(Rambler(), ["shapes_mc"], str(tmp_path), tiny_shapes_dir, batch_size=8,
                             limits=limits, judge=judge)["shapes_mc"]
  # Every answer was unplaced by the rules and went to the judge; each is placed by it or counted as unplaced.
  assert len(asked) == 8 and results["judge/placed"] + results["unplaced"] == 8
  verdicts = (tmp_path / "predictions" / "shapes_mc.judge.jsonl").read_text().splitlines()
  assert len(verdicts) == 8 and all(isinstance(json.loads(row)["answer"], str) for row in verdicts)
  again = harness.evaluate(Rambler(), ["shapes_mc"], str(tmp_path), tiny_shapes_dir, batch_size=8, limits=limits,
                           judge=judge)["shapes_mc"]
  assert again == results and len(asked) == 8  # the verdicts came from the file
  with pytest.raises(judge_lib.JudgeUnreachable, match="serves \\['judge'\\], not 'gpt-4o'"):
    judge_lib.Judge(f"{served_judge}:gpt-4o").check()


def test_an_unreachable_judge_stops_eval_before_the_model_loads(tmp_path):
  url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "eval", "--checkpoint", str(tmp_path / "no_model"),
                           "--out", str(tmp_path / "results.json"), "--judge", url],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, judge_lib.API_KEY: "none"})
  assert result.returncode != 0
  assert f"vlmjax eval: --judge: the judge at {url} does not answer" in result.stderr  # not the missing model


def test_mmbench_answers_the_rules_leave_go_to_the_judge(tmp_path):
  import base64
  import io

  import numpy as np
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
  image = base64.b64encode(buffer.getvalue()).decode()
  rows = [["index", "question", "hint", "A", "B", "answer", "category", "l2-category", "image"],
          ["0", "What is it?", "", "a cat", "a dog", "A", "animals", "perception", image]]
  tsv = tmp_path / "mmbench.tsv"
  tsv.write_text("\n".join("\t".join(row) for row in rows) + "\n")
  benchmark = registry.get(f"mmbench:{tsv}")
  samples = benchmark.samples("")  # the question and its rotated copy
  answers = ["a feline, I think"] * len(samples)  # no rule places it
  assert benchmark.score(samples, answers)["unplaced"] == 2
  judge = ScriptedJudge(lambda prompt: "A" if "A. a cat" in prompt else "B")
  judged, metrics = judge_lib.judge_answers(judge, benchmark, samples, answers, str(tmp_path / "j.jsonl"),
                                            {"model": None})
  assert metrics == {"judge/placed": 2.0}
  scores = benchmark.score(samples, judged)
  assert scores["accuracy"] == 1.0 and scores["unplaced"] == 0
