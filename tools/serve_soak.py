"""The soak of tools/bench_serve.py (and tests/serve/test_soak.py): many streaming clients that hang up at random,
then what they left behind on the server.

Each client is a thread looping until the deadline: a streamed chat request about one of a few images, read for a
random number of chunks, then, with probability `hangup`, the connection closed mid-stream, else read to [DONE].
A request under way at the deadline is finished as it would have been. Raw `http.client`, one connection per
request: closing it is the hang-up the server must notice, with no client-side pool that might keep it open.
"""

import collections
import http.client
import json
import threading
import time
import urllib.parse

import numpy as np
import serve_load  # this folder is on sys.path (the tools' own, or the test's insert)

# Outcomes of a request that are not failures.
FINE = ("completed", "hung up")


def soak(url: str, model: str, images: list[str], seconds: float, *, clients: int = 64, hangup: float = 0.3,
         max_tokens: int = 32, question_words: int = 8, seed: int = 0) -> collections.Counter:
  """Outcome counts: 'completed', 'hung up' (FINE), and failures: 'HTTP <status>', 'error event' (an error sent
  mid-stream, a 500 after the 200), 'truncated' (the stream ended without [DONE]), or an exception's name."""
  where = urllib.parse.urlsplit(url)
  deadline, counts, lock = time.monotonic() + seconds, collections.Counter(), threading.Lock()

  def loop(index: int) -> None:
    rng = np.random.default_rng([seed, index])
    while time.monotonic() < deadline:
      tokens = int(rng.integers(1, max_tokens + 1))
      body = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": True,
              "messages": [serve_load.user_turn(serve_load.words(rng, question_words), images[rng.integers(
                  len(images))])]}
      # The first chunk is the role's, then one per decoded piece of text, then the finish reason's.
      hang_up_after = int(rng.integers(1, tokens + 2)) if rng.random() < hangup else None
      outcome = _stream(where.hostname, where.port, body, hang_up_after)
      with lock:
        counts[outcome] += 1

  threads = [threading.Thread(target=loop, args=(i,), name=f"soak-{i}") for i in range(clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return counts


def _stream(host: str, port: int, body: dict, hang_up_after: int | None) -> str:
  """One streamed chat request; its outcome (see `soak`)."""
  connection = http.client.HTTPConnection(host, port, timeout=300)
  try:
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
      return f"HTTP {response.status}"
    chunks = 0
    for line in response:  # server-sent events: "data: {...}", blank lines between
      if not line.startswith(b"data: "):
        continue
      data = line[len(b"data: "):].strip()
      if data == b"[DONE]":
        return "completed"
      if "error" in json.loads(data):
        return "error event"
      chunks += 1
      if chunks == hang_up_after:
        return "hung up"  # the connection is closed below, mid-stream
    return "truncated"
  except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
    return type(error).__name__
  finally:
    connection.close()


def failures(counts: collections.Counter) -> dict[str, int]:
  return {outcome: count for outcome, count in counts.items() if outcome not in FINE}


def server_errors(counts: collections.Counter) -> int:
  """Requests that got a 5xx: as the status, or as an error event after the 200 (the server's 500s)."""
  return sum(count for outcome, count in counts.items()
             if outcome == "error event" or (outcome.startswith("HTTP 5")))


def wait_drained(url: str, timeout: float = 30.0) -> tuple[dict[str, float], float]:
  """Polls /metrics until no request runs or waits and no KV-cache page is held, `timeout` seconds at most;
  -> (the last metrics read, seconds waited). The caller checks them: they are not 0 when it timed out."""
  start = time.monotonic()
  while True:
    metrics = serve_load.read_metrics(url)
    drained = all(metrics[name] == 0 for name in ("vlmjax_kv_pages_used", "vlmjax_requests_running",
                                                   "vlmjax_requests_waiting"))
    if drained or time.monotonic() - start > timeout:
      return metrics, time.monotonic() - start
    time.sleep(0.2)


def rss_bytes(pid: int) -> int:
  """Resident memory of process `pid` (VmRSS of /proc/PID/status)."""
  with open(f"/proc/{pid}/status") as status:
    kib = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
  return int(kib) * 1024
