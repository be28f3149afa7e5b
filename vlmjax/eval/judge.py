"""An LLM judge behind any OpenAI-compatible endpoint (`vlmjax serve` included), for the answers rules cannot place.

    vlmjax eval --workdir runs/shapes --out results.json --judge http://127.0.0.1:8000/v1[:MODEL]

Two questions go to it, in the manner of VLMEvalKit's judges:
- multiple choice (`choice_prompt`, after VLMEvalKit's `build_prompt` in vlmeval/dataset/utils/multiple_choice.py):
  which option an answer means, for answers the matching rules (`metrics.extract_choice`) leave unplaced; it
  replies with a letter, or Z when no option fits;
- open answers (`match_prompt`): whether an answer means the same as a reference, for answers that match none
  exactly after the VQA normalization.
A reply that is neither a valid letter nor yes / no leaves the answer unplaced: it is counted, never silently
scored as wrong. The judge is asked once per (sample, answer): the harness keeps the verdicts beside the answers.
"""

import json
import os
import re

import openai

from vlmjax.eval import answer_cache, benchmarks, metrics

API_KEY = "VLMJAX_JUDGE_API_KEY"  # the endpoint's key, when it wants one
CHOICE_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in {letters} (if they are valid options), and Z.\n"
    "Example 1:\nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2:\nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3:\nQuestion: {question}\nOptions: {options}\nAnswer: {answer}\nYour output: ")
MATCH_PROMPT = (
    "You are an AI assistant who will help me to judge an answer to a question about an image. You are provided "
    "with the question, the reference answers and a model's answer, and you need to say whether the model's answer "
    "means the same as one of the references. Output a single word, yes or no.\n"
    "Question: {question}\nReference answers: {references}\nModel's answer: {answer}\nYour output: ")
LETTERS = "ABCDEFGHIJ"


class JudgeUnreachable(RuntimeError):
  """The judge's endpoint did not answer, or serves no model."""


def parse_spec(spec: str) -> tuple[str, str | None]:
  """'URL[:MODEL]' -> (base URL, model or None). The model is what follows the last ':' when that is neither a
  port nor part of the path: 'http://127.0.0.1:8000/v1:judge' names model 'judge', 'http://127.0.0.1:8000/v1'
  none."""
  head, _, tail = spec.rpartition(":")
  if head and tail and "/" not in tail and not tail.isdigit() and "://" in head:
    return head, tail
  return spec, None


class Judge:
  """An OpenAI-compatible chat endpoint asked greedily, one short reply per question."""

  def __init__(self, spec: str, timeout: float = 120.0):
    self.url, self.model = parse_spec(spec)
    self._client = openai.OpenAI(base_url=self.url, api_key=os.environ.get(API_KEY, "none"), timeout=timeout,
                                 max_retries=2)

  def check(self) -> None:
    """Fails (JudgeUnreachable, naming the URL) unless the endpoint answers and serves the model; without a model
    named, takes the first it lists. Call it before anything else runs."""
    try:
      models = [model.id for model in self._client.models.list()]
    except openai.OpenAIError as error:
      raise JudgeUnreachable(f"the judge at {self.url} does not answer ({type(error).__name__}: {error})") from error
    if not models or (self.model is not None and self.model not in models):
      raise JudgeUnreachable(f"the judge at {self.url} serves {models or 'no model'}, not {self.model!r}")
    self.model = self.model or models[0]

  def fingerprint(self) -> dict:
    """What a verdict depends on besides the question: the endpoint, its model and the prompts."""
    return {"url": self.url, "model": self.model, "prompts": [CHOICE_PROMPT, MATCH_PROMPT]}

  def ask(self, prompt: str) -> str:
    reply = self._client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                 temperature=0, max_tokens=8)
    return reply.choices[0].message.content or ""


def choice_prompt(question: str, options: list[str], answer: str) -> str:
  letters = LETTERS[:len(options)]
  listed = " ".join(f"{letter}. {option}" for letter, option in zip(letters, options))
  return CHOICE_PROMPT.format(letters=", ".join(letters), question=question, options=listed, answer=answer)


def parse_choice(reply: str, num_options: int) -> str | None:
  """The option letter a choice reply names, or None (Z: no option fits; anything else: no verdict)."""
  found = re.findall(rf"\b([{LETTERS[:num_options]}Z])\b", reply.strip())
  return found[0] if len(set(found)) == 1 and found[0] != "Z" else None


def match_prompt(question: str, references: list[str], answer: str) -> str:
  return MATCH_PROMPT.format(question=question, references="; ".join(dict.fromkeys(references)), answer=answer)


def parse_match(reply: str) -> bool | None:
  """True for yes, False for no, None for a reply that is neither."""
  words = re.findall(r"[a-z]+", reply.lower())
  verdicts = {word for word in words if word in ("yes", "no")}
  return None if len(verdicts) != 1 else verdicts.pop() == "yes"


def judge_answers(judge: Judge, benchmark: benchmarks.Benchmark, samples: list[benchmarks.Sample],
                  answers: list[str], path: str, answers_fingerprint: dict) -> tuple[list[str], dict[str, float]]:
  """The judge's verdicts on what the rules cannot settle, asked once and kept in `path` (a .judge.jsonl beside the
  answers, tied to the judge and to the answers' fingerprint).

  Multiple choice (`benchmark.choices`): every answer the rules (`benchmark.extract`) leave unplaced goes to the
  judge; the answers returned carry the letter it names instead, so that the benchmark's score places them, and
  the metrics are `judge/placed`. Open questions (`benchmark.references`): every answer that matches no reference
  after the VQA normalization goes to the judge; the metrics are `judge/accuracy` (exact matches and the judge's
  yes, over all samples) and `judge/unplaced` (replies neither yes nor no). Other benchmarks: unchanged, no metrics.
  """
  if benchmark.choices is None and benchmark.references is None:
    return answers, {}
  expected = {"model": answers_fingerprint.get("model"), "judge": judge.fingerprint(), "answers": answers_fingerprint}
  verdicts = answer_cache.rows_made_by(path, expected)
  if benchmark.choices is not None:
    asked = [i for i, (sample, answer) in enumerate(zip(samples, answers))
             if benchmark.extract(answer, benchmark.choices(sample)) is None]
    prompt = lambda sample, answer: choice_prompt(sample.prompt, benchmark.choices(sample), answer)
  else:
    normalized = lambda text: metrics.normalize_vqa_answer(str(text))
    asked = [i for i, (sample, answer) in enumerate(zip(samples, answers))
             if normalized(answer) not in {normalized(ref) for ref in benchmark.references(sample)}]
    prompt = lambda sample, answer: match_prompt(sample.prompt, benchmark.references(sample), answer)
  with open(path, "a") as out:
    for i in asked:
      if samples[i].id not in verdicts:
        verdicts[samples[i].id] = judge.ask(prompt(samples[i], answers[i]))
        out.write(json.dumps({"id": samples[i].id, "answer": verdicts[samples[i].id]}) + "\n")
        out.flush()
  if benchmark.choices is not None:
    placed = {i: parse_choice(verdicts[samples[i].id], len(benchmark.choices(samples[i]))) for i in asked}
    judged = [placed.get(i) or answer for i, answer in enumerate(answers)]
    return judged, {"judge/placed": float(sum(letter is not None for letter in placed.values()))}
  matches = [parse_match(verdicts[samples[i].id]) for i in asked]
  exact = len(samples) - len(asked)
  return answers, {"judge/accuracy": (exact + sum(match is True for match in matches)) / max(len(samples), 1),
                   "judge/unplaced": float(sum(match is None for match in matches))}
