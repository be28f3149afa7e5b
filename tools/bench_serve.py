"""Serving benchmark: the same load through the HTTP API against continuous batching, static batching and one
request at a time, with the definitions `vllm bench serve` uses.

    python tools/bench_serve.py --num_prompts 64 --max_concurrency 16 --request_rate inf --plot /tmp/serve.png
    python tools/bench_serve.py --checkpoint runs/shapes --data_dir runs/shapes/data   # shapes questions

Each request is a chat turn with an image (the shapes validation images and questions with --data_dir, else
random images and prompts of --prompt_words words), streamed (`stream: true`). Requests arrive as a Poisson
process at --request_rate per second (gamma intervals with --burstiness != 1; `inf`: all at once), at most
--max_concurrency in flight. Per request: TTFT (arrival to the first streamed token), TPOT = (latency - TTFT) /
(output tokens - 1), inter-token latencies (gaps between streamed chunks) and end-to-end latency; per run:
request throughput, output tokens/s, and goodput (requests/s meeting both --ttft_slo and --tpot_slo). The
default model is tools/bench_decode.py's LLaVA of 23.8 M parameters with random weights. Two last figures: the
TTFT of a second question about an image already asked about, with and without prefix caching; and how many
short requests run at once in a pool with the memory of --capacity_slots full slots. Prints the host (CPU model,
cores, JAX devices) first and the dtype the servers compute in above the first table.

    python tools/bench_serve.py --rates 0.5,1,2,4,8 --num_conversations 16 --plot /tmp/knee.png
    python tools/bench_serve.py --soak 60

--rates, instead of the modes' comparison: multi-turn chats about images of mixed sizes (64 to 1024 px a side),
arriving as a Poisson process at each rate in turn, against continuous batching with prefix caching; a table of
throughput, goodput and TTFT/TPOT percentiles per rate and the knee, the rate past which goodput stops rising
(tools/serve_load.py). --soak [SECONDS], instead of the modes' comparison: --soak_clients streaming clients that
hang up mid-stream at random, then the checks: no 5xx or other failure, no KV page held and no request running once
they stop, the server's resident memory (VmRSS) at the end within 10% of its value after a warm-up of
--soak_warmup seconds of the same clients before the soak's SECONDS (the warm-up compiles the shapes the load
meets) (tools/serve_soak.py); exits 1 when a check fails.
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import multiprocessing
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request

import numpy as np
import uvicorn
from PIL import Image

import bench_decode  # tools/bench_decode.py: this script's own folder is on sys.path
import roofline
import serve_load
import serve_soak
import vlmjax
from vlmjax import runtime
from vlmjax import workdir as workdir_lib
from vlmjax.interop import hf_config
from vlmjax.models.vlm import VLMConfig
from vlmjax.serve.server import create_app

MODES = {"continuous": dict(), "static": dict(static_batching=True), "single": dict(num_slots=1)}


def _png_url(pixels: np.ndarray) -> str:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


# LLaVA-1.5's conversation format.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: {% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
                 "<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_chat_checkpoint(directory: str) -> None:
  """bench_decode's LLaVA, with `<image>` a special token of its tokenizer and LLaVA-1.5's chat template."""
  import tokenizers
  bench_decode.build_checkpoint(directory)
  path = os.path.join(directory, "tokenizer.json")
  backend = tokenizers.Tokenizer.from_file(path)
  backend.add_special_tokens([tokenizers.AddedToken("<image>", special=True)])
  backend.save(path)
  with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
    f.write(CHAT_TEMPLATE)


def make_requests(args) -> list[tuple[str, str]]:
  """(image data: URL, question) per request."""
  rng = np.random.default_rng(args.seed)
  if args.data_dir:
    from vlmjax.data import shapes
    source = shapes.load(args.data_dir, "validation")
    records = [source[i] for i in range(min(len(source), args.num_prompts))]
    questions = [(record["image"], question["question"]) for record in records for question in record["vqa"]]
    return [(_png_url(image), question) for image, question in questions[:args.num_prompts]]
  return [(_png_url(rng.integers(0, 256, (112, 112, 3), np.uint8)),
           " ".join(f"w{word}" for word in rng.integers(3, 3999, args.prompt_words)))
          for _ in range(args.num_prompts)]


def checkpoint_dtype(checkpoint: str) -> str:
  """The dtype `vlmjax.load(checkpoint)` computes in, read from its config as `load` reads it (a workdir's
  `model.dtype`; a Hugging Face directory's config.json), without loading the weights."""
  if workdir_lib.is_workdir(checkpoint):
    config = workdir_lib.read_config(checkpoint)
  else:
    with open(os.path.join(checkpoint, "config.json")) as f:
      config = hf_config.from_hf(json.load(f)).config
  return roofline.compute_dtype(VLMConfig.from_dict(config.model))


# `vlmjax.load`'s dtype, quantize and kv_cache_dtype for every server this run starts (--dtype, --quantize, ...).
LOAD_OPTIONS: dict = {}


def _serve(checkpoint: str, settings: dict, port: int, load_options: dict | None = None) -> None:
  """The server process: the model loaded, its app served on the loopback port until SIGTERM."""
  uvicorn.run(create_app(vlmjax.load(checkpoint, **(load_options or {})), "bench", **settings), host="127.0.0.1",
              port=port, log_level="warning")


class Server:
  """`create_app(vlmjax.load(checkpoint), "bench", **settings)` served by uvicorn on a free loopback port, in a
  process of its own as a deployed server runs: the load generator's Python (the OpenAI client parsing every
  streamed chunk) does not take the server's interpreter lock, which at hundreds of chunks a second would slow
  the engine loop and bias the comparison against the modes that stream fastest."""

  def __init__(self, checkpoint: str, **settings):
    with socket.socket() as probe:
      probe.bind(("127.0.0.1", 0))
      port = probe.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self.process = multiprocessing.get_context("spawn").Process(target=_serve,
                                                                args=(checkpoint, settings, port, dict(LOAD_OPTIONS)))

  def __enter__(self):
    self.process.start()
    deadline = time.monotonic() + 600
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5):
          return self
      except OSError:
        if not self.process.is_alive() or time.monotonic() > deadline:
          raise RuntimeError(f"the benchmark server did not come up (exit code {self.process.exitcode})")
        time.sleep(0.2)

  def __exit__(self, *exc):
    self.process.terminate()  # SIGTERM: the server finishes what is in flight and exits
    self.process.join()


async def run_load(url: str, requests: list[tuple[str, str]], args) -> tuple[list[dict], float]:
  """Every request, arriving as the load says; -> (per-request results, wall-clock seconds)."""
  rng = np.random.default_rng(args.seed)
  limit = asyncio.Semaphore(args.max_concurrency)

  async def limited(client, image, question):
    async with limit:
      return await serve_load.stream_chat(client, [serve_load.user_turn(question, image)], args.max_tokens)

  async with serve_load.client(url) as client:
    start, tasks = time.perf_counter(), []
    for image, question in requests:
      tasks.append(asyncio.create_task(limited(client, image, question)))
      if args.request_rate != float("inf"):  # gamma intervals with mean 1/rate (burstiness 1: Poisson)
        await asyncio.sleep(rng.gamma(args.burstiness, 1.0 / (args.request_rate * args.burstiness)))
    results = await asyncio.gather(*tasks)
  return results, time.perf_counter() - start


def prefix_reuse(args, requests) -> dict[str, float]:
  """Median TTFT of a second question about an image already asked about, without and with prefix caching."""
  images = [image for image, _ in requests[:args.prefix_images]]
  medians = {}
  for caching in (False, True):
    with Server(args.checkpoint, num_slots=args.slots, max_len=args.max_len, page_size=args.prefix_page_size,
                prefix_caching=caching) as server:
      async def ask():
        async with serve_load.client(server.url) as client:
          ask_about = lambda image, question, tokens: serve_load.stream_chat(
              client, [serve_load.user_turn(question, image)], tokens)
          await ask_about(images[0], "warm up w5", args.max_tokens)  # compiles
          repeated = []
          for image in images:
            await ask_about(image, "first question w7 w8", 2)
            repeated.append((await ask_about(image, "second question w9", 2))["ttft"])
          return statistics.median(repeated)
      medians["prefix caching" if caching else "no prefix caching"] = asyncio.run(ask())
  return medians


def capacity(args) -> dict[str, float]:
  """Concurrent sequences a pool with the memory of `--capacity_slots` full slots holds, with short prompts:
  a server of 8x as many slots over that pool takes a burst of short text requests, and /metrics is polled for
  the peak of requests holding a slot."""
  full_slots, slots = args.capacity_slots, 8 * args.capacity_slots
  num_pages = full_slots * -(-args.max_len // args.page_size)  # the memory of full_slots [max_len] slots
  with Server(args.checkpoint, num_slots=slots, max_len=args.max_len, page_size=args.page_size,
              num_pages=num_pages) as server:
    async def burst():
      peak, preempted, done = 0, 0.0, False

      async def poll():
        nonlocal peak, preempted
        while not done:
          now = await asyncio.to_thread(serve_load.read_metrics, server.url)  # off the loop sending the requests
          peak = max(peak, int(now["vlmjax_requests_running"]))
          preempted = now["vlmjax_preemptions_total"]
          await asyncio.sleep(0.01)

      async with serve_load.client(server.url) as client:
        await client.completions.create(model="bench", prompt="w5 w6", max_tokens=2)  # compiles
        poller = asyncio.create_task(poll())
        await asyncio.gather(*(client.completions.create(model="bench", prompt=f"w{7 + i} w8 w9", max_tokens=8)
                               for i in range(2 * slots)))
        done = True
        await poller
      return {"slots of full-length memory": full_slots, "pages": num_pages, "peak concurrent": peak,
              "preemptions": preempted}
    return asyncio.run(burst())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=None, help="a workdir or Hugging Face directory (default: "
                      "bench_decode's random LLaVA)")
  parser.add_argument("--data_dir", default=None, help="a shapes data set: its validation questions as prompts")
  parser.add_argument("--num_prompts", type=int, default=64)
  parser.add_argument("--prompt_words", type=int, default=32)
  parser.add_argument("--max_tokens", type=int, default=32)
  parser.add_argument("--request_rate", type=float, default=float("inf"))
  parser.add_argument("--burstiness", type=float, default=1.0)
  parser.add_argument("--max_concurrency", type=int, default=16)
  parser.add_argument("--slots", type=int, default=16, help="decode slots of the batching modes")
  parser.add_argument("--max_len", type=int, default=256, help="tokens per slot (prompt + output)")
  parser.add_argument("--page_size", type=int, default=16, help="tokens per KV-cache page")
  parser.add_argument("--prefill_budget", type=int, default=1024, help="prompt tokens prefilled per decode step at "
                      "most (0: no limit)")
  parser.add_argument("--prefix_page_size", type=int, default=4, help="pages of the prefix-reuse table: a hit "
                      "needs the image's last token inside a full page shared by both questions")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--ttft_slo", type=float, default=2.0, help="seconds, for goodput")
  parser.add_argument("--tpot_slo", type=float, default=0.1, help="seconds, for goodput")
  parser.add_argument("--prefix_images", type=int, default=5, help="images of the prefix-reuse table (0: skip)")
  parser.add_argument("--capacity_slots", type=int, default=4, help="the capacity table: a pool with the memory of "
                      "this many full slots (0: skip)")
  parser.add_argument("--repeats", type=int, default=3, help="measured rounds per mode (medians are reported)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", default=None, help="PNG: output tokens/s against p90 TTFT per mode (with --rates: "
                      "throughput, goodput and p99 TTFT against the rate)")
  realistic = parser.add_argument_group("the realistic load (tools/serve_load.py), instead of the modes' comparison")
  realistic.add_argument("--rates", default=None, help="conversations/s to sweep, e.g. 0.5,1,2,4,8")
  realistic.add_argument("--num_conversations", type=int, default=16, help="conversations per rate")
  realistic.add_argument("--turns", type=int, default=3, help="turns per conversation")
  realistic.add_argument("--turn_words", type=int, default=8, help="words per question (multi-turn and soak)")
  soaking = parser.add_argument_group("the soak (tools/serve_soak.py), instead of the modes' comparison")
  soaking.add_argument("--soak", type=float, nargs="?", const=60.0, default=None, metavar="SECONDS",
                       help="streaming clients hanging up at random for SECONDS (60 if none given)")
  soaking.add_argument("--soak_clients", type=int, default=64)
  soaking.add_argument("--hangup", type=float, default=0.3, help="probability that a client hangs up mid-stream")
  soaking.add_argument("--soak_warmup", type=float, default=30.0, help="seconds of the same clients before the soak: "
                       "the RSS baseline is read at its end (it compiles the shapes the load meets)")
  loading = parser.add_argument_group("the model's numbers (vlmjax.load), for every server")
  loading.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  loading.add_argument("--quantize", default=None, help="int8, int4[:GROUP] or w8a8")
  loading.add_argument("--kv_cache_dtype", default=None, help="int8: int8 pages, a scale per token and head")
  args = parser.parse_args()
  LOAD_OPTIONS.update(dtype=args.dtype, quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
  print(roofline.host_description())
  print(f"vlmjax.load options: dtype={args.dtype}, quantize={args.quantize}, kv_cache_dtype={args.kv_cache_dtype}")
  with tempfile.TemporaryDirectory() as scratch:  # the servers load the default checkpoint from here
    if args.checkpoint is None:
      args.checkpoint = os.path.join(scratch, "llava")
      build_chat_checkpoint(args.checkpoint)
    if args.rates is None and args.soak is None:
      benchmark(args)
    if args.rates is not None:
      sweep(args)
    if args.soak is not None and not soak(args):
      raise SystemExit("the soak failed a check (above)")


def sweep(args) -> None:
  """The realistic load at each rate against continuous batching with prefix caching; prints the table."""
  print(f"the server computes in {checkpoint_dtype(args.checkpoint)}; {args.slots} slots of {args.max_len} tokens, "
        f"pages of {args.page_size}, prefix caching")
  with Server(args.checkpoint, num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
              prefill_budget=args.prefill_budget or None, prefix_caching=True) as server:
    rows = serve_load.sweep(server.url, args)
  serve_load.print_sweep(rows, args)
  if args.plot:
    serve_load.plot_sweep(rows, args.plot)


def soak(args) -> bool:
  """--soak_clients streaming clients hanging up at random for --soak_warmup + --soak seconds against continuous
  batching (no prefix caching: its pages stay held by design), then the checks: no failed request, no page held
  and no request running once they stop, the server's resident memory at the end within 10% of its value at the
  end of the warm-up, a normal request answered. Prints them; -> whether all passed."""
  rng = np.random.default_rng(args.seed)
  images = [serve_load.mixed_image(rng) for _ in range(8)]
  with Server(args.checkpoint, num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
              prefill_budget=args.prefill_budget or None) as server:
    pid, rss, stop, start = server.process.pid, [], threading.Event(), time.monotonic()  # rss: (seconds, bytes)

    def sample_rss():
      while not stop.wait(1.0):
        rss.append((time.monotonic() - start, serve_soak.rss_bytes(pid)))

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    counts = serve_soak.soak(server.url, "bench", images, args.soak_warmup + args.soak, clients=args.soak_clients,
                             hangup=args.hangup, max_tokens=args.max_tokens, question_words=args.turn_words,
                             seed=args.seed)
    stopped = time.monotonic() - start
    metrics, waited = serve_soak.wait_drained(server.url)
    stop.set()
    sampler.join()
    end_rss = serve_soak.rss_bytes(pid)
    answer = asyncio.run(_ask(server.url, images[0]))
  requests, fails, errors = sum(counts.values()), serve_soak.failures(counts), serve_soak.server_errors(counts)
  print(f"\nsoak: {args.soak_clients} streaming clients, {args.soak_warmup:.0f} s of warm-up + {args.soak:.0f} s "
        f"(hang-up probability {args.hangup}, max_tokens 1-{args.max_tokens}, 8 images 64-1024 px), {args.slots} "
        f"slots; the clients stopped after {stopped:.1f} s\n{requests} requests ({requests / stopped:.1f}/s): "
        f"{counts['completed']} read to the end, {counts['hung up']} hung up mid-stream" +
        (f"; failures: {fails}" if fails else ""))
  gib, warm_rss = 2.0 ** 30, next(value for seconds, value in rss if seconds >= args.soak_warmup)
  checks = {
      f"5xx: {errors}, other failures: {sum(fails.values()) - errors}": not fails,
      f"{waited:.1f} s after the clients stopped: {metrics['vlmjax_kv_pages_used']:.0f} KV pages in use (of "
      f"{metrics['vlmjax_kv_pages_total']:.0f}), {metrics['vlmjax_requests_running']:.0f} requests running, "
      f"{metrics['vlmjax_requests_waiting']:.0f} waiting":
          all(metrics[f"vlmjax_{name}"] == 0 for name in ("kv_pages_used", "requests_running", "requests_waiting")),
      f"RSS {warm_rss / gib:.3f} GiB after the warm-up, peak {max(value for _, value in rss) / gib:.3f} GiB, "
      f"{end_rss / gib:.3f} GiB at the end ({100 * (end_rss / warm_rss - 1):+.1f}%, within 10%)":
          abs(end_rss / warm_rss - 1) <= 0.1,
      f"then a normal request: {answer['output_tokens']} tokens": answer["output_tokens"] > 0}
  for check, passed in checks.items():
    print(f"  {'ok    ' if passed else 'FAILED'} {check}")
  every = max(1, round(len(rss) / 12))
  print("  RSS GiB by second: " + ", ".join(f"{seconds:.0f}: {value / gib:.3f}" for seconds, value in rss[::every]))
  return all(checks.values())


async def _ask(url: str, image: str) -> dict:
  async with serve_load.client(url) as client:
    return await serve_load.stream_chat(client, [serve_load.user_turn("w5 w6 w7", image)], 4)


def benchmark(args) -> None:
  """Every mode under the load, then the prefix-reuse and capacity figures; prints them (and writes the plot)."""
  requests = make_requests(args)
  print(f"{len(requests)} requests, max_tokens {args.max_tokens}, rate {args.request_rate}/s, burstiness "
        f"{args.burstiness}, max concurrency {args.max_concurrency}, {args.slots} slots; the servers compute in "
        f"{checkpoint_dtype(args.checkpoint)}")
  modes = args.modes.split(",")
  rounds = {mode: [] for mode in modes}
  with contextlib.ExitStack() as stack:
    settings = dict(num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
                    prefill_budget=args.prefill_budget or None)
    servers = {mode: stack.enter_context(Server(args.checkpoint, **{**settings, **MODES[mode]})) for mode in modes}
    for server in servers.values():
      # The same load twice unmeasured: it compiles the prefill buckets and batch sizes and the step's read widths
      # that the measured runs meet (the second pass meets the batch sizes the first happened not to).
      for _ in range(2):
        asyncio.run(run_load(server.url, requests, args))
    for _ in range(args.repeats):  # the modes in turn, so that a change in the machine's speed falls on all
      for mode, server in servers.items():
        rounds[mode].append(serve_load.summarize(*asyncio.run(run_load(server.url, requests, args)), args))
  rows = {mode: _medians(runs) for mode, runs in rounds.items()}
  print(f"\nmedians of {args.repeats} rounds\n{'mode':>10} {'req/s':>6} {'tok/s':>7} {'good/s':>6} | "
        f"{'TTFT mean':>9} {'p50':>6} {'p90':>6} {'p99':>6} | {'TPOT mean ms':>12} {'p90':>6} | "
        f"{'ITL p50 ms':>10} {'p99':>6} | {'E2E p50 s':>9} {'p90':>6}")
  for mode, row in rows.items():
    ttft, tpot, itl, e2e = row["ttft"], row["tpot"], row["itl"], row["e2e"]
    print(f"{mode:>10} {row['requests/s']:6.2f} {row['output tok/s']:7.1f} {row['goodput req/s']:6.2f} | "
          f"{ttft['mean']:9.3f} {ttft['p50']:6.3f} {ttft['p90']:6.3f} {ttft['p99']:6.3f} | "
          f"{1e3 * tpot['mean']:12.2f} {1e3 * tpot['p90']:6.2f} | {1e3 * itl['p50']:10.2f} {1e3 * itl['p99']:6.2f} | "
          f"{e2e['p50']:9.3f} {e2e['p90']:6.3f}")
  comparisons = [("continuous", "single", "continuous / one at a time, output tokens/s", lambda r: r["output tok/s"]),
                 ("static", "continuous", "p90 TTFT, static / continuous", lambda r: r["ttft"]["p90"])]
  for a, b, name, figure in comparisons:
    if a in rows and b in rows:
      per_round = ", ".join(f"{figure(x) / figure(y):.2f}x" for x, y in zip(rounds[a], rounds[b]))
      print(f"{name}: {figure(rows[a]) / figure(rows[b]):.2f}x of the medians (rounds: {per_round})")
  if args.prefix_images:
    medians = prefix_reuse(args, requests)
    print("\nTTFT of a second question about the same image (median of "
          f"{args.prefix_images} images): " + ", ".join(f"{k} {v:.3f} s" for k, v in medians.items()) +
          f" ({medians['no prefix caching'] / medians['prefix caching']:.2f}x)")
  if args.capacity_slots:
    held = capacity(args)
    print(f"\nShort requests (a 3-word prompt, 8 tokens) in a pool of {held['pages']} pages, the memory of "
          f"{held['slots of full-length memory']} slots of {args.max_len} tokens: {held['peak concurrent']} "
          f"sequences at once ({held['peak concurrent'] / held['slots of full-length memory']:.1f}x), "
          f"{held['preemptions']:.0f} preemptions")
  if args.plot:
    _plot(rows, args.plot)


def _medians(runs: list[dict]) -> dict:
  """The figure-by-figure median of several rounds' summaries (nested dicts of numbers)."""
  return {key: _medians([run[key] for run in runs]) if isinstance(value, dict) else
          statistics.median(run[key] for run in runs) for key, value in runs[0].items()}


def _plot(rows: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(figsize=(5, 4))
  for mode, row in rows.items():
    axes.scatter(row["ttft"]["p90"], row["output tok/s"], s=60)
    axes.annotate(mode, (row["ttft"]["p90"], row["output tok/s"]), textcoords="offset points", xytext=(5, 5))
  axes.set_xlabel("p90 time to first token (s)")
  axes.set_ylabel("output tokens/s")
  axes.set_title("Serving: throughput against latency")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  main()
