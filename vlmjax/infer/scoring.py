"""The log-probabilities of a text's own tokens: what OpenAI's completions return for the prompt with `echo` and
`logprobs` (lm-evaluation-harness scores multiple-choice answers so). One forward pass over the prompt, padded to
its length bucket (one compilation per bucket), beside the engine's decode loop.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.infer import generate as generation
from vlmjax.infer.requests import TokenLogprob
from vlmjax.infer.sampling import TokenScores, token_scores
from vlmjax.models.vlm import VLM as VLMModel
from vlmjax.models.vlm import VLMConfig


def prompt_logprobs(params, config: VLMConfig, token_ids: Sequence[int], pad_id: int,
                    buckets: Sequence[int] = generation.BUCKETS) -> list[TokenLogprob]:
  """TokenLogprob of each token of a text-only prompt after the first (len(token_ids) - 1 of them): log-softmax of
  the model's logits at the token before it, and the likeliest tokens there."""
  bucket = generation.bucket_length(len(token_ids), buckets)
  input_ids = np.full((1, bucket), pad_id, np.int32)
  input_ids[0, :len(token_ids)] = token_ids
  scores = jax.device_get(_score(params, config, input_ids))
  return [TokenLogprob(logprob=float(scores.chosen[i]), top=tuple(zip(scores.top_ids[i].tolist(),
                                                                       scores.top[i].tolist())))
          for i in range(len(token_ids) - 1)]


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, config: VLMConfig, input_ids: jax.Array) -> TokenScores:
  """input_ids int32[1, T] (right-padded; causal, so the padding changes nothing before it) -> TokenScores of
  rows T - 1: row t scores token t + 1 under the logits at t."""
  logits, _ = VLMModel(config).apply({"params": params}, input_ids, None)
  return token_scores(logits[0, :-1], input_ids[0, 1:])
