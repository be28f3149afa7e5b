"""The server's Prometheus metrics (GET /metrics), in a registry of their own."""

import prometheus_client
from prometheus_client.core import CounterMetricFamily

from vlmjax.infer import paged
from vlmjax.infer.engine import Engine
from vlmjax.infer.requests import Request


class Metrics:
  """The server's Prometheus metrics, in a registry of its own."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    options = {"registry": self.registry}
    self.running = prometheus_client.Gauge("vlmjax_requests_running", "Requests holding a decode slot.", **options)
    self.waiting = prometheus_client.Gauge("vlmjax_requests_waiting", "Requests queued for a slot.", **options)
    self.warm_up = prometheus_client.Gauge("vlmjax_warm_up_seconds", "Start-up time compiling (or reading from the "
                                           "compilation cache) the engine's programs.", **options)
    self.ttft = prometheus_client.Histogram(
        "vlmjax_time_to_first_token_seconds", "From arrival to the first generated token.",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), **options)
    self.tpot = prometheus_client.Histogram(
        "vlmjax_time_per_output_token_seconds", "Mean time between a request's generated tokens after the first.",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), **options)
    self.prompt_tokens = prometheus_client.Counter("vlmjax_prompt_tokens", "Prompt tokens prefilled.", **options)
    self.generated = prometheus_client.Counter("vlmjax_generation_tokens", "Tokens generated.", **options)
    self.finished = prometheus_client.Counter("vlmjax_requests_finished", "Requests ended, by finish reason.",
                                              ["finish_reason"], **options)
    self.pages_used = prometheus_client.Gauge("vlmjax_kv_pages_used", "KV-cache pages held (requests and the "
                                              "prefix cache).", **options)
    self.pages_total = prometheus_client.Gauge("vlmjax_kv_pages_total", "KV-cache pages in the pool.", **options)
    self.pool_tokens = prometheus_client.Gauge("vlmjax_kv_pool_tokens", "Tokens the KV-cache pool holds.", **options)
    self.pool_bytes = prometheus_client.Gauge("vlmjax_kv_pool_bytes", "Bytes of the KV-cache pool's keys and values "
                                              "(INT8 scales included).", **options)
    self.prefix_hits = prometheus_client.Counter("vlmjax_prefix_cache_hits", "Requests that read part of their "
                                                 "prompt from the prefix cache.", **options)
    self.prefix_hit_tokens = prometheus_client.Counter("vlmjax_prefix_cache_hit_tokens", "Prompt tokens read from "
                                                       "the prefix cache instead of prefilled.", **options)

  def watch(self, engine: Engine) -> None:
    self.running.set_function(lambda: engine.num_running)
    self.waiting.set_function(lambda: engine.num_waiting)
    self.pages_used.set_function(lambda: engine.pages.num_pages - engine.pages.num_free)
    self.pages_total.set(engine.pages.num_pages)
    self.pool_tokens.set(engine.pages.num_pages * engine.page_size)
    self.pool_bytes.set(paged.pool_bytes(engine.config, engine.pages.num_pages, engine.page_size))
    self.registry.register(_Preemptions(engine))

  def observe(self, request: Request) -> None:
    """Called by the engine as each request ends."""
    self.finished.labels(request.finish_reason).inc()
    self.generated.inc(len(request.token_ids))
    if request.cached_tokens:
      self.prefix_hits.inc()
      self.prefix_hit_tokens.inc(request.cached_tokens)
    if request.first_token_at is None:
      return
    self.prompt_tokens.inc(len(request.prompt_ids))
    self.ttft.observe(request.first_token_at - request.submitted_at)
    if len(request.token_ids) > 1:
      self.tpot.observe((request.finished_at - request.first_token_at) / (len(request.token_ids) - 1))


class _Preemptions:
  """vlmjax_preemptions_total: the engine's count, read as /metrics is scraped."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def collect(self):
    yield CounterMetricFamily(
        "vlmjax_preemptions", "Requests preempted for want of KV-cache pages (prefilled again later).",
        value=self.engine.num_preemptions)
