"""The OpenAI features clients use, through the real `openai` client: logprobs (chat, and completions' echo as
lm-evaluation-harness scores with it), `n` choices with a seed, JSON replies to a schema, cached prompt tokens,
usage in a stream and max_completion_tokens."""

import base64
import io
import json

import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image

from vlmjax.serve.server import create_app

MODEL = "tiny"
MAX_LEN = 96


@pytest.fixture(scope="module")
def client(tiny_vlm, serve_app):
  app = create_app(tiny_vlm, MODEL, num_slots=4, max_len=MAX_LEN, page_size=4, prefix_caching=True)
  with serve_app(app) as port:
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


def _png_url(seed: int) -> str:
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), np.uint8)).save(out, format="PNG")
  return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _log_softmax(vlm, token_ids: list[int], pixel_values) -> np.ndarray:
  """float64[T, V]: vlmjax's own logits for the sequence, log-softmaxed."""
  logits = np.asarray(vlm.logits(np.array([token_ids]), pixel_values)[0], np.float64)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)


def test_chat_logprobs_are_the_log_softmax_of_the_model_s_logits(client, tiny_vlm):
  url = _png_url(0)
  reply = client.chat.completions.create(
      model=MODEL, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
      messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour is the circle?"}]}])
  content = reply.choices[0].logprobs.content
  assert len(content) == reply.usage.completion_tokens and all(len(entry.top_logprobs) == 3 for entry in content)
  conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
  prompt = tiny_vlm.prompt_ids(conversation, 1)
  image = Image.open(io.BytesIO(base64.b64decode(url.split(",")[1])))
  pixel_values = tiny_vlm.image_processor([image])
  ids = tiny_vlm.generate_ids(np.array([prompt]), pixel_values, max_new_tokens=5)[0, :len(content)].tolist()
  assert [bytes(entry.bytes) for entry in content] == [tiny_vlm.tokenizer.token_bytes[token] for token in ids]
  expected = _log_softmax(tiny_vlm, prompt + ids, pixel_values)
  for step, (entry, token) in enumerate(zip(content, ids)):
    row = expected[len(prompt) - 1 + step]
    np.testing.assert_allclose(entry.logprob, row[token], rtol=1e-4, atol=1e-5)
    assert entry.top_logprobs[0].logprob == pytest.approx(row.max(), rel=1e-4, abs=1e-5)
    assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the likeliest token
    assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_completions_echo_scores_the_prompt_as_lm_eval_harness_reads_it(client, tiny_vlm):
  prompt = "What colour is the circle? red"
  reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
  choice = reply.choices[0]
  ids = tiny_vlm.tokenizer.encode(prompt)
  expected = _log_softmax(tiny_vlm, ids, None)
  assert choice.text == prompt and reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
  logprobs = choice.logprobs
  assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
  np.testing.assert_allclose(logprobs.token_logprobs[1:], [expected[t, ids[t + 1]] for t in range(len(ids) - 1)],
                             rtol=1e-4, atol=1e-5)
  assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
  streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                            stream=True, stream_options={"include_usage": True}))
  assert streamed[0].choices[0].text == prompt and streamed[0].choices[0].finish_reason == "length"
  assert streamed[0].choices[0].logprobs.token_logprobs == logprobs.token_logprobs
  assert streamed[-1].usage.prompt_tokens == len(ids) and streamed[-1].usage.completion_tokens == 0
  assert logprobs.text_offset == sorted(logprobs.text_offset)
  # With tokens generated too: the prompt's entries, then the completion's.
  both = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0)
  plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, logprobs=1, temperature=0)
  assert both.choices[0].text == prompt + plain.choices[0].text
  assert both.choices[0].logprobs.tokens[len(ids):] == plain.choices[0].logprobs.tokens
  # (One of the two reads its prompt from the prefix cache: the same numbers, to float32 rounding.)
  np.testing.assert_allclose(both.choices[0].logprobs.token_logprobs[len(ids):],
                             plain.choices[0].logprobs.token_logprobs, rtol=1e-5)


def test_n_choices_with_a_seed_are_reproducible(client):
  settings = dict(model=MODEL, messages=[{"role": "user", "content": "Describe the picture"}], max_tokens=8,
                  temperature=1.5, n=3, seed=11)
  first, second = (client.chat.completions.create(**settings) for _ in range(2))
  texts = [choice.message.content for choice in first.choices]
  assert [choice.index for choice in first.choices] == [0, 1, 2]
  assert texts == [choice.message.content for choice in second.choices]
  assert len(set(texts)) > 1  # each choice samples with a seed of its own
  streamed = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
  by_choice = {index: "".join(chunk.choices[0].delta.content or "" for chunk in streamed
                              if chunk.choices and chunk.choices[0].index == index) for index in range(3)}
  assert [by_choice[index] for index in range(3)] == texts
  assert streamed[-1].usage.completion_tokens == first.usage.completion_tokens


SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "count"], "additionalProperties": False}


def test_a_json_schema_reply_parses_and_validates(client):
  for seed in range(3):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How many circles are there?"}], max_tokens=60,
        temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
  reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=60,
                                         temperature=0, response_format={"type": "json_object"})
  assert isinstance(json.loads(reply.choices[0].message.content), dict)
  with pytest.raises(openai.BadRequestError, match="response_format"):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "bad", "schema": {"type": "object", "required": 3}}})


def test_cached_prompt_tokens_and_max_completion_tokens(client):
  messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url(3)}},
                                           {"type": "text", "text": "How many triangles are there?"}]}]
  client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
  again = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
  assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
  assert again.usage.completion_tokens <= 3
