"""Test-session setup: the CPU platform with 8 fake devices (for the sharding tests), XLA's CPU backend
unoptimized, and JAX's persistent compilation cache.

XLA_FLAGS and the cache's settings must be set before JAX reads them, hence here, before any test module
imports jax. Single-device tests are unaffected: arrays live on the first device unless a test shards them.
"""

import os

# XLA's CPU backend without its LLVM optimizations (the HLO passes, fusion included, still run): the tests' tiny
# programs cost their compile, not their run, and the suite spends a third less CPU time (models + generate
# tests: 411 s against 281 s). Training runs, benchmarks and the server outside the tests keep the default.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    "--xla_backend_optimization_level=0"]).strip()
# Those 8 devices are the CPU platform's: on a GPU or TPU host JAX would take the accelerator instead and give the
# sharding tests its one or few devices. So the CPU, unless the run names a platform (README: the GPU-relevant tests
# under JAX_PLATFORMS=cuda); the commands the tests start inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Through the environment, so that the runs the tests start in subprocesses (`vlmjax train`, the server) share
# the cache too: a resumed run, or a second run of one config, loads its programs instead of compiling them.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("VLMJAX_TEST_CACHE",
                                                        os.path.expanduser("~/.cache/vlmjax/jax-test-cache"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

# The setting `vlmjax` commands re-execute themselves with (vlmjax/runtime.py), given up front: the commands the
# tests start in subprocesses then run at once instead of starting twice. tests/test_runtime.py clears it.
from vlmjax import runtime  # noqa: E402

if runtime.huge_pages_on_request():
  os.environ.setdefault("GLIBC_TUNABLES", f"{runtime.HUGE_PAGES}=1")

import jax  # noqa: E402
import pytest  # noqa: E402

# XLA's CPU backend maps a few pages of memory for each kernel of a program it compiles (hundreds for a training
# step), held while the program lives, and JAX's caches keep every program a process compiles. One worker's share
# of the suite reached Linux's limit on a process's memory maps (vm.max_map_count, 65,530 by default): LLVM's
# next mmap failed ("Cannot allocate memory"), and the compile error took the worker down with a segmentation
# fault (two core dumps: 65,410 and 65,428 maps). So the caches are dropped between test files past half the limit,
# and within a file past three quarters (one file alone added 24,000 maps).
_MAX_MAPS = "/proc/sys/vm/max_map_count"


def _drop_compiled_programs_past(fraction: float) -> None:
  """jax.clear_caches() when this process holds more than `fraction` of the memory maps Linux allows it (where
  /proc tells)."""
  try:
    with open(_MAX_MAPS) as limit, open("/proc/self/maps") as maps:
      in_use, allowed = sum(1 for _ in maps), int(limit.read())
  except OSError:
    return
  if in_use > fraction * allowed:
    jax.clear_caches()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_between_files():
  yield
  _drop_compiled_programs_past(1 / 2)


@pytest.fixture(autouse=True)
def _drop_compiled_programs_before_the_limit():
  yield
  _drop_compiled_programs_past(3 / 4)


# The longest files (minutes each with a fresh compilation cache on 2 cores), longest first.
LONGEST_FILES = ("tests/train/test_trainer", "tests/serve/test_engine_variable_tokens.py", "tests/serve/test_engine.py",
                 "tests/interop/test_finetune_variable_tokens.py", "tests/test_checkpoint_faults.py",
                 "tests/interop/test_finetune.py", "tests/test_notebook.py", "tests/serve/test_warm_up.py")


def pytest_collection_modifyitems(items):
  """The longest files first (LONGEST_FILES), the rest in their order: xdist hands each file to one worker
  (pyproject.toml) as workers come free, so a long file started last would run on alone after every other file has
  finished, and short files last fill the workers' ends evenly."""
  def rank(item) -> int:
    return next((i for i, prefix in enumerate(LONGEST_FILES) if item.nodeid.startswith(prefix)), len(LONGEST_FILES))
  items.sort(key=rank)  # stable: each file's tests keep their order


# The splits of the tiny shapes data set the data, training and evaluation tests share.
TINY_SHAPES_SPLITS = dict(train=64, validation=12, test=8)


@pytest.fixture(scope="session")
def tiny_shapes_splits() -> dict[str, int]:
  return dict(TINY_SHAPES_SPLITS)


@pytest.fixture(scope="session")
def tiny_shapes_dir(tmp_path_factory) -> str:
  """A tiny shapes data set (with its tokenizer and image-processor files), built once per test session."""
  from vlmjax.data import shapes

  directory = str(tmp_path_factory.mktemp("tiny_shapes"))
  config = shapes.get_config().unlock()
  config.splits = dict(TINY_SHAPES_SPLITS)
  shapes.build(directory, config)
  return directory


# A tiny random-weight VLM with a real tokenizer, chat template and image processor, shared by the serving and
# judge tests (one model, so each jitted function compiles once per test session and worker).
VOCAB = 128
TEXTS = ["USER: ASSISTANT:", "What colour is the circle?", "The red circle is left of the blue square.",
         "How many triangles are there? There are two green triangles.", "Describe the picture in detail."] * 4


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
  import json

  import flax.linen as nn
  import jax
  import ml_collections

  from configs import sizes
  from vlmjax.api import VLM
  from vlmjax.data import shapes_tokenizer
  from vlmjax.data.images import ImageProcessor
  from vlmjax.data.tokenizer import Tokenizer
  from vlmjax.models.vlm import VLM as VLMModel
  from vlmjax.models.vlm import VLMConfig

  directory = str(tmp_path_factory.mktemp("tiny_vlm"))
  shapes_tokenizer.train(TEXTS, directory, vocab_size=VOCAB)
  with open(f"{directory}/preprocessor_config.json", "w") as f:
    json.dump(ImageProcessor(size={"height": 16, "width": 16}).to_dict(), f)
  tokenizer = Tokenizer.from_directory(directory)
  assert tokenizer.vocab_size <= VOCAB, tokenizer.vocab_size
  model = {
      "vision": sizes.vit("Ti/16", "clip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
      "decoder": sizes.lm("tiny", vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
      "image_token_id": tokenizer.backend.token_to_id(shapes_tokenizer.IMAGE), "vision_feature_layer": -2}
  config = VLMConfig.from_dict(model)
  params = nn.meta.unbox(VLMModel(config).init(jax.random.key(1), **config.example_inputs(1)))["params"]
  # Larger weights make greedy decoding less flat, so a wrong cache row shows up as different tokens.
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
  return VLM(config=ml_collections.ConfigDict({"model": model}), params=params, tokenizer=tokenizer,
             image_processor=ImageProcessor.from_directory(directory), eos_token_ids=(tokenizer.eos_token_id,),
             pad_token_id=tokenizer.pad_token_id)


@pytest.fixture
def compilations():
  """A collections.Counter, by event, of the programs JAX traces or compiles while the test runs (after the fixtures
  set up before this one): how a test shows that a warmed-up engine compiles nothing."""
  import collections
  compiled = collections.Counter()
  events = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")
  listener = lambda name, seconds, **kwargs: compiled.update([name]) if name in events else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield compiled
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def serve_process():
  """`start(checkpoint, log_path, *flags)`: a context manager that runs `vlmjax serve --checkpoint CHECKPOINT` on a
  free loopback port in a process of its own, waits until /health answers, yields (process, port) and kills the
  process after; a server that dies or does not answer within 180 s fails with its log. It starts without
  --warm_up unless the flags say otherwise."""
  import contextlib
  import http.client
  import socket
  import subprocess
  import sys
  import time

  @contextlib.contextmanager
  def start(checkpoint: str, log_path, *flags: str):
    with socket.socket() as probe:
      probe.bind(("127.0.0.1", 0))
      port = probe.getsockname()[1]
    with open(log_path, "w") as log:
      # Without --warm_up the server starts at once, compiling as requests come (tests/serve/test_warm_up.py has it).
      warm_up = () if any(flag.startswith(("--warm_up", "--nowarm_up")) for flag in flags) else ("--nowarm_up",)
      process = subprocess.Popen([sys.executable, "-m", "vlmjax.cli", "serve", "--checkpoint", checkpoint, "--port",
                                  str(port), *warm_up, *flags], stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 180
      while True:
        try:
          connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
          connection.request("GET", "/health")
          if connection.getresponse().status == 200:
            break
        except OSError:  # not listening yet
          pass
        assert process.poll() is None and time.monotonic() < deadline, open(log_path).read()
        time.sleep(0.2)
      yield process, port
    finally:
      process.kill()
      process.wait(30)
  return start
