"""A short soak against a real `vlmjax serve` process, with the clients of tools/serve_soak.py: streaming clients
that hang up mid-stream at random leave no failed request, no KV-cache page held and no request running, and the
server still answers. (Its resident memory is checked by `tools/bench_serve.py --soak`: 10 s are too noisy.)"""

import pathlib
import sys

import numpy as np
import openai

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "tools"))  # the benchmark's own clients
import serve_load  # noqa: E402
import serve_soak  # noqa: E402

MAX_LEN = 64


def test_streaming_clients_that_hang_up_leave_no_failure_page_or_request_behind(tiny_vlm, tmp_path, serve_process):
  from vlmjax.interop import hf
  checkpoint = str(tmp_path / "tiny")
  hf.save_pretrained(checkpoint, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=MAX_LEN)
  rng = np.random.default_rng(0)
  images = [serve_load.mixed_image(rng, 16, 256) for _ in range(4)]  # resized to 16 x 16 by the server
  log = tmp_path / "serve.log"
  # Fewer slots than clients: requests wait for a slot, and some clients hang up while theirs waits.
  with serve_process(checkpoint, log, "--slots", "4", "--page_size", "4") as (process, port):
    url = f"http://127.0.0.1:{port}"
    counts = serve_soak.soak(url, "tiny", images, 10, clients=12, hangup=0.5, max_tokens=16, question_words=3)
    assert not serve_soak.failures(counts), f"{dict(counts)}; the server's log:\n{log.read_text()}"
    assert counts["hung up"] and counts["completed"], f"the soak did not exercise both endings: {dict(counts)}"
    metrics, waited = serve_soak.wait_drained(url, timeout=10)
    left = {name: metrics[name] for name in ("vlmjax_kv_pages_used", "vlmjax_requests_running",
                                             "vlmjax_requests_waiting")}
    assert not any(left.values()), f"{waited:.1f} s after the clients stopped: {left}"
    assert metrics['vlmjax_requests_finished_total{finish_reason="cancelled"}'] > 0  # the hang-ups were noticed
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="tiny", messages=[serve_load.user_turn("What colour?", images[0])],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    assert process.poll() is None
