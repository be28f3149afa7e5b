"""The log-probabilities of a reply in OpenAI's two shapes: chat's `content` list and the legacy completions' lists.
Token texts are the UTF-8 bytes each token adds (`Tokenizer.token_bytes`), decoded with replacement."""

from collections.abc import Sequence

from vlmjax.infer.requests import TokenLogprob
from vlmjax.serve import protocol


def _text(token_bytes: bytes) -> str:
  return token_bytes.decode("utf-8", errors="replace")


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprob],
                  token_bytes: Sequence[bytes]) -> protocol.ChatLogprobs:
  def top(token: int, logprob: float) -> protocol.TopLogprob:
    return protocol.TopLogprob(token=_text(token_bytes[token]), logprob=logprob, bytes=list(token_bytes[token]))
  return protocol.ChatLogprobs(content=[
      protocol.ChatTokenLogprob(**top(token, scores.logprob).model_dump(),
                                top_logprobs=[top(*alternative) for alternative in scores.top])
      for token, scores in zip(token_ids, logprobs)])


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None],
                        token_bytes: Sequence[bytes], text_start: int = 0) -> protocol.CompletionLogprobs:
  """`logprobs`: one per token, None where there is none (the prompt's first token); offsets from `text_start`."""
  texts = [_text(token_bytes[token]) for token in token_ids]
  offsets, offset = [], text_start
  for text in texts:
    offsets.append(offset)
    offset += len(text)
  return protocol.CompletionLogprobs(
      tokens=texts, token_logprobs=[None if scores is None else scores.logprob for scores in logprobs],
      top_logprobs=[None if scores is None else {_text(token_bytes[token]): logprob for token, logprob in scores.top}
                    for scores in logprobs],
      text_offset=offsets)
