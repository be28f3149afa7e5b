"""The realistic load of tools/bench_serve.py, and its sweep over request rates.

A conversation is k turns about one image: each turn is sent once the previous reply has arrived, with the whole
history (the image in the first user message, the assistant's replies as they were streamed), so every turn after
the first starts with the previous turn's prompt and reads it from the prefix cache. Images are of mixed sizes,
width and height each log-uniform in [64, 1024] pixels (smooth random pictures with a little noise, as JPEG), so
the server's image processor decodes and resizes a different amount of data each time. Conversations arrive as a
Poisson process; requests are not limited in number in flight (an open loop: what a rate past the knee does to
latency is what the sweep is for).

Here too, the pieces the other modes share: `stream_chat` (one streamed chat request through the OpenAI client),
`summarize` (per-request results -> throughput, goodput and percentiles) and `read_metrics` (the server's /metrics).
"""

import asyncio
import base64
import dataclasses
import io
import statistics
import time
import urllib.request

import numpy as np
import openai
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def client(url: str) -> openai.AsyncOpenAI:
  return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600.0)


def user_turn(question: str, image: str | None = None) -> dict:
  """A user message: the image (a data: URL) first when given, then the question."""
  image_part = [{"type": "image_url", "image_url": {"url": image}}] if image else []
  return {"role": "user", "content": [*image_part, {"type": "text", "text": question}]}


async def stream_chat(chat: openai.AsyncOpenAI, messages: list[dict], max_tokens: int, model: str = "bench") -> dict:
  """One streamed chat request -> {ttft, latency, output_tokens, itl: [s], text} (seconds from the call)."""
  start, chunk_times, output_tokens, text = time.perf_counter(), [], 0, []
  stream = await chat.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
  async for chunk in stream:
    if chunk.usage:
      output_tokens = chunk.usage.completion_tokens
    if chunk.choices and chunk.choices[0].delta.content:
      chunk_times.append(time.perf_counter())
      text.append(chunk.choices[0].delta.content)
  latency = time.perf_counter() - start
  ttft = (chunk_times[0] - start) if chunk_times else latency
  return {"ttft": ttft, "latency": latency, "output_tokens": output_tokens, "text": "".join(text),
          "itl": list(np.diff(chunk_times)) if len(chunk_times) > 1 else []}


def summarize(results: list[dict], duration: float, args) -> dict:
  """Request throughput, output tokens/s, goodput (requests/s meeting both args.ttft_slo and args.tpot_slo) and the
  mean and percentiles of TTFT, TPOT, inter-token latency and end-to-end latency."""
  tpot = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in results if r["output_tokens"] > 1]
  itl = [gap for r in results for gap in r["itl"]]
  good = sum(r["ttft"] <= args.ttft_slo and (r["output_tokens"] <= 1 or (r["latency"] - r["ttft"]) / (
      r["output_tokens"] - 1) <= args.tpot_slo) for r in results)
  stats = lambda values: {"mean": statistics.fmean(values), **{f"p{q}": float(np.percentile(values, q))
                                                             for q in (50, 90, 99)}} if values else {}
  return {"requests/s": len(results) / duration, "output tok/s": sum(r["output_tokens"] for r in results) / duration,
          "goodput req/s": good / duration, "duration s": duration, "ttft": stats([r["ttft"] for r in results]),
          "tpot": stats(tpot), "itl": stats(itl), "e2e": stats([r["latency"] for r in results])}


def read_metrics(url: str) -> dict[str, float]:
  """The server's /metrics, {sample name with its labels as written: value}, e.g. 'vlmjax_kv_pages_used'."""
  with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
    text = response.read().decode()
  return {sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"
                         if sample.labels else ""): sample.value
          for family in text_string_to_metric_families(text) for sample in family.samples}


def mixed_image(rng: np.random.Generator, low: int = 64, high: int = 1024) -> str:
  """A JPEG data: URL of width and height each log-uniform in [low, high]: an 8x8 random picture resized smoothly,
  plus noise of standard deviation 8 (a photograph's size on the wire, not random pixels' incompressible one)."""
  width, height = np.exp(rng.uniform(np.log(low), np.log(high), 2)).round().astype(int)
  coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize((width, height), Image.BICUBIC)
  pixels = np.asarray(coarse, np.float32) + rng.normal(0, 8, (height, width, 3))  # (H, W, 3)
  out = io.BytesIO()
  Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
  return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def words(rng: np.random.Generator, count: int) -> str:
  """`count` words of tools/bench_decode.py's word-level vocabulary (w3 .. w3998)."""
  return " ".join(f"w{word}" for word in rng.integers(3, 3999, count))


@dataclasses.dataclass(frozen=True)
class Conversation:
  image: str  # a data: URL, sent with the first question
  questions: tuple[str, ...]  # one per turn


def conversations(count: int, turns: int, question_words: int, seed: int) -> list[Conversation]:
  rng = np.random.default_rng(seed)
  return [Conversation(mixed_image(rng), tuple(words(rng, question_words) for _ in range(turns)))
          for _ in range(count)]


async def run_conversations(url: str, talks: list[Conversation], rate: float, max_tokens: int,
                            seed: int = 0) -> tuple[list[dict], float]:
  """Every conversation, arriving as a Poisson process of `rate` conversations/s, each turn sent when the previous
  reply is in; -> (per-request results, each with its `turn` (0 first), wall-clock seconds)."""
  rng = np.random.default_rng(seed)

  async def talk(chat, conversation: Conversation) -> list[dict]:
    messages, results = [], []
    for turn, question in enumerate(conversation.questions):
      messages.append(user_turn(question, conversation.image if turn == 0 else None))
      result = await stream_chat(chat, messages, max_tokens)
      messages.append({"role": "assistant", "content": result["text"]})
      results.append({**result, "turn": turn})
    return results

  async with client(url) as chat:
    start, tasks = time.perf_counter(), []
    for i, conversation in enumerate(talks):
      if i:
        await asyncio.sleep(rng.exponential(1.0 / rate))
      tasks.append(asyncio.create_task(talk(chat, conversation)))
    per_conversation = await asyncio.gather(*tasks)
  return [result for results in per_conversation for result in results], time.perf_counter() - start


def sweep(url: str, args) -> list[dict]:
  """The realistic load at each of args.rates (conversations/s), after the same sweep once unmeasured (it compiles
  the prefill buckets, batch sizes and decode read widths each rate meets: one compilation in a measured run stalls
  every request in flight for seconds); each run gets conversations of its own seed, so none starts with a prefix
  another left in the cache. -> one summary per rate, with `cached`: the fraction of prompt tokens read from the
  prefix cache."""
  rates = [float(rate) for rate in args.rates.split(",")]
  make = lambda seed: conversations(args.num_conversations, args.turns, args.turn_words, seed)
  for i, rate in enumerate(rates):
    asyncio.run(run_conversations(url, make(args.seed + len(rates) + i), rate, args.max_tokens, args.seed))
  rows = []
  for i, rate in enumerate(rates):
    before = read_metrics(url)
    results, duration = asyncio.run(run_conversations(url, make(args.seed + i), rate, args.max_tokens, args.seed))
    after = read_metrics(url)
    delta = lambda name: after[name] - before[name]
    rows.append({"rate": rate, **summarize(results, duration, args),
                 "cached": delta("vlmjax_prefix_cache_hit_tokens_total") / delta("vlmjax_prompt_tokens_total")})
  return rows


def knee(rows: list[dict], near: float = 0.9) -> float | None:
  """The rate past which goodput stops rising: the lowest swept rate whose goodput is within `near` of the sweep's
  highest (a dip of one noisy rate does not end the rise early); None when that is the highest rate swept, where
  goodput may still be rising."""
  best = max(row["goodput req/s"] for row in rows)
  found = next(row["rate"] for row in rows if row["goodput req/s"] >= near * best)
  return None if found == rows[-1]["rate"] else found


def print_sweep(rows: list[dict], args) -> None:
  print(f"\n{args.num_conversations} conversations of {args.turns} turns per rate ({args.turn_words}-word questions, "
        f"max_tokens {args.max_tokens}, images 64-1024 px a side); goodput: TTFT <= {args.ttft_slo} s and TPOT <= "
        f"{1e3 * args.tpot_slo:.0f} ms; requests offered per second: {args.turns} x conv/s\n{'conv/s':>6} {'req/s':>6} {'tok/s':>7} {'good/s':>6} {'good %':>6} | "
        f"{'TTFT p50 s':>10} {'p99':>6} | {'TPOT p50 ms':>11} {'p99':>7} | {'cached %':>8}")
  for row in rows:
    ttft, tpot = row["ttft"], row["tpot"]
    print(f"{row['rate']:6.2f} {row['requests/s']:6.2f} {row['output tok/s']:7.1f} {row['goodput req/s']:6.2f} "
          f"{100 * row['goodput req/s'] / row['requests/s']:6.1f} | {ttft['p50']:10.3f} {ttft['p99']:6.3f} | "
          f"{1e3 * tpot['p50']:11.2f} {1e3 * tpot['p99']:7.2f} | {100 * row['cached']:8.1f}")
  found = knee(rows)
  print(f"knee: {found} conversations/s (goodput within 10% of the sweep's highest from there on up)"
        if found is not None else f"knee: not below {rows[-1]['rate']} conversations/s, the highest rate swept "
        "(goodput only reached 90% of its highest there)")


def plot_sweep(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rates = [row["rate"] for row in rows]
  figure, axes = plt.subplots(figsize=(6, 4))
  axes.plot(rates, [row["requests/s"] for row in rows], "o-", label="throughput")
  axes.plot(rates, [row["goodput req/s"] for row in rows], "s-", label="goodput")
  axes.set_xscale("log", base=2)
  axes.set_xticks(rates, [f"{rate:g}" for rate in rates])
  axes.set_xlabel("conversations arriving per second")
  axes.set_ylabel("requests/s")
  latency = axes.twinx()
  latency.plot(rates, [row["ttft"]["p99"] for row in rows], "^--", color="tab:red", label="p99 TTFT")
  latency.set_ylabel("p99 time to first token (s)")
  latency.set_yscale("log")
  figure.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
  axes.set_title("Multi-turn chats: throughput against request rate")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  print(f"wrote {path}")
