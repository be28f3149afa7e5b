"""The `vlmjax` command: summarize, data, train, eval, report, generate, serve, quantize, export.

    vlmjax summarize --config configs/shapes_tiny.py --config.mesh.tensor=2 --devices 8

Each subcommand takes absl flags; `--config FILE` with `--config.a.b=value` overrides (ml_collections).
"""

import sys

from absl import flags
from ml_collections import config_flags

from vlmjax import runtime

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "data build: the output directory; data show: the PNG to write; eval: "
                           "results.json (predictions go beside it); report: the Markdown file; export: the directory "
                           "to write.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "data show, eval, report: where the shapes data set was built "
                                "(default for eval and report: the workdir's).")
_SPLIT = flags.DEFINE_string("split", None, "data show: which split to picture (default validation); eval: the "
                             "shapes split the built-in benchmarks read, test (the default: the held-out split) or "
                             "validation.")
_BASELINE = flags.DEFINE_string("baseline", None, "eval: an earlier results.json; exit 1 if a metric fell by more "
                                "than --max_drop. report: show each metric's change against it.")
_MAX_DROP = flags.DEFINE_float("max_drop", 0.01, "eval --baseline: how far a metric may fall, in its own units.")
_JUDGE = flags.DEFINE_string("judge", None, "eval: an OpenAI-compatible endpoint, URL[:MODEL] (e.g. "
                             "http://127.0.0.1:8000/v1:judge; `vlmjax serve` is one), that places the multiple-choice "
                             "answers the rules cannot and matches open answers by meaning; its key from "
                             "$VLMJAX_JUDGE_API_KEY.")
_WORKDIR = flags.DEFINE_string("workdir", None, "train, eval: the run's directory (checkpoints, metrics, config).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "train: resume a workdir even though its "
                                         "saved config differs from --config.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "eval, generate, serve, export: a training workdir or a Hugging "
                                  "Face model directory.")
_ADAPTERS = flags.DEFINE_bool("adapters", False, "export: a lora run's adapters and projector alone, in PEFT's layout "
                              "(adapter_config.json, adapter_model.safetensors), instead of the merged model.")
_BENCHMARKS = flags.DEFINE_string(
    "benchmarks", None, "eval: comma-separated benchmarks (default: every built-in one; shapes_retrieval only when "
    "the workdir still holds its contrastive stage's checkpoint). Built in: shapes_vqa, shapes_caption, "
    "shapes_pope, shapes_mc, shapes_grounding, shapes_retrieval. Files on disk: [NAME=]KIND:ARG:ARG..., the kinds "
    "listed below the flags. NAME (default: KIND) keys results.json and the cached predictions, e.g. "
    "textvqa=vqav2:q.json:a.json:images:{image_id}.jpg. Paths may not contain ',' or ':'.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "eval: prompts generated together.")
_DEVICES = flags.DEFINE_integer("devices", None, "summarize: plan the mesh and the memory per device for this "
                                "many devices (default: the devices JAX sees).")
_IMAGE = flags.DEFINE_string("image", None, "generate: an image file (PNG, JPEG, ...).")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the question or instruction about the image.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "generate: tokens to produce at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "generate: the sampling seed.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: the address to bind (loopback by default).")
_PORT = flags.DEFINE_integer("port", 8000, "serve: the port to listen on.")
_SLOTS = flags.DEFINE_integer("slots", 8, "serve: decode slots, the requests generated together.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "serve: tokens per slot, prompt + generated (default: the "
                                "checkpoint's context, else 2048).")
_API_KEY = flags.DEFINE_string("api_key", None, "serve: require 'Authorization: Bearer KEY' on /v1/ routes "
                               "(default: $VLMJAX_API_KEY; none when unset).")
flags.DEFINE_alias("api-key", "api_key")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "serve: a directory whose image files requests may name by "
                                 "local path (default: none; images come as base64 data: URLs).")
_PAGES = flags.DEFINE_integer("pages", None, "serve: KV-cache pages in the pool (default: the memory of a [slots, "
                              "max_len] cache in the compute dtype: every slot full, and with --kv_cache_dtype int8 "
                              "more pages in those bytes); short requests hold only the pages they need.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "serve: tokens per KV-cache page.")
_PREFIX_CACHING = flags.DEFINE_bool("prefix_caching", False, "serve: share the pages of a repeated image and "
                                    "prompt prefix between requests (causal models).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "serve: prompt tokens per prefill call; a longer "
                                      "prompt is prefilled in chunks between decode steps (0: each prompt whole).")
_PREFILL_BUDGET = flags.DEFINE_integer("prefill_budget", 1024, "serve: prompt tokens prefilled per decode step at "
                                       "most, so that a burst of new prompts delays the running streams by one bounded "
                                       "prefill (0: no limit).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "serve: the model name clients send (default: the "
                                  "checkpoint directory's name).")
_VISUAL_TOKENS = flags.DEFINE_string("visual_tokens", None, "generate, eval, serve: METHOD:KEEP, each image reduced "
                                     "to KEEP tokens (a count or a fraction) without retraining: visionzip, tome or "
                                     "pool; or fastv:KEEP[:LAYER], pruned inside the language model from LAYER "
                                     "(vlmjax/models/visual_tokens.py).")
_MAX_BODY_BYTES = flags.DEFINE_integer("max_body_bytes", 64 * 2**20, "serve: a larger request body gets 413, from "
                                       "its Content-Length before it is read.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 8, "serve: images per request at most.")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", 4096 * 4096, "serve: pixels per image at most.")
_MAX_REQUEST_PIXELS = flags.DEFINE_integer("max_request_pixels", 4 * 2048 * 2048, "serve: pixels of a request's "
                                           "images in all at most.")
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 256, "serve: requests queued for a slot at most; more get 503 "
                                    "with Retry-After.")
_METRICS_NEED_KEY = flags.DEFINE_bool("metrics_need_key", False, "serve: /metrics needs the API key too.")
_WARM_UP = flags.DEFINE_bool("warm_up", True, "serve: compile every program the engine can need (up to "
                             "--max_images images a request) before taking requests, so none compiles while serving.")
_WARM_UP_IMAGE_SIZES = flags.DEFINE_list("warm_up_image_sizes", [], "serve: for a model whose images give a token "
                                         "count each (LLaVA-NeXT, Qwen2.5-VL), image sizes WIDTHxHEIGHT (e.g. "
                                         "1280x720,448x448) whose prefills --warm_up compiles too; others compile "
                                         "when first asked for.")
_DOCS = flags.DEFINE_bool("docs", False, "serve: FastAPI's /docs, /redoc and /openapi.json (off by default).")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, "serve: a directory for JAX's persistent "
                                         "compilation cache: a restarted server reads its start-up programs from it.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "generate, eval, serve, quantize: the compute "
                           "and weight dtype (default: float32 on a CPU, or a workdir's config; bfloat16 on a GPU or "
                           "TPU).")
_QUANTIZE = flags.DEFINE_string("quantize", None, "generate, eval, serve, quantize: low-bit weights for the language "
                                "model and projector: int8 (per output channel), int4 or int4:GROUP (groups of 128 or "
                                "GROUP inputs), w8a8 (INT8 weights and per-token INT8 activations).")
_QUANTIZE_VISION = flags.DEFINE_bool("quantize_vision", False, "generate, eval, serve, quantize: quantize the vision "
                                     "tower's linear layers too.")
_KV_CACHE_DTYPE = flags.DEFINE_string("kv_cache_dtype", None, "generate, eval, serve: int8 keys and values (a scale "
                                      "per token and head) in the KV cache and the paged pool (default: the compute "
                                      "dtype).")
_MESH = flags.DEFINE_string("mesh", None, "generate, eval, serve: shard the weights over this process's devices, "
                            "e.g. tensor=4 or fsdp=4,tensor=2 (axes data, fsdp, tensor).")


def _mesh(text: str | None) -> dict[str, int] | None:
  """`fsdp=4,tensor=2` -> {"fsdp": 4, "tensor": 2}; SystemExit naming what is wrong."""
  if not text:
    return None
  mesh = {}
  for part in text.split(","):
    axis, _, size = part.partition("=")
    if not size.strip().isdigit():
      raise SystemExit(f"vlmjax: --mesh {text!r}: expected AXIS=SIZE,... with whole sizes (tensor=4,fsdp=2)")
    mesh[axis.strip()] = int(size)
  return mesh


def _image_sizes(values: list[str]) -> list[tuple[int, int]]:
  """(height, width) of each WIDTHxHEIGHT; SystemExit naming one that is not two positive integers."""
  sizes = []
  for value in values:
    width, _, height = value.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
      raise SystemExit(f"vlmjax serve: --warm_up_image_sizes takes WIDTHxHEIGHT sizes such as 1280x720, got {value!r}")
    sizes.append((int(height), int(width)))
  return sizes


def _load_options() -> dict:
  """The flags generate, eval and serve pass to `vlmjax.load`."""
  return dict(dtype=_DTYPE.value, quantize=_QUANTIZE.value, kv_cache_dtype=_KV_CACHE_DTYPE.value,
              quantize_vision=_QUANTIZE_VISION.value, visual_tokens=_VISUAL_TOKENS.value, mesh=_mesh(_MESH.value))


def _load(path: str, command: str):
  """`vlmjax.load` with the command's flags; a setting the model cannot take ends the command with its message."""
  import vlmjax

  try:
    return vlmjax.load(path, **_load_options())
  except ValueError as error:
    raise SystemExit(f"vlmjax {command}: {error}") from error


def summarize(args: list[str]) -> None:
  """Parameters per module and total, each parameter's sharding under the config's mesh, and the bytes per device
  of training it (parameters, optimizer state, gradients, activations) fully, with LoRA and with QLoRA."""
  del args
  import jax

  from vlmjax.models.summary import summarize as summary
  from vlmjax.train import memory, pipeline_plan

  if _CONFIG.value is None:
    raise SystemExit("vlmjax summarize: --config FILE is required")
  num_devices = _DEVICES.value or jax.device_count()
  print(summary(_CONFIG.value, num_devices))
  print()
  print(memory.report(_CONFIG.value, num_devices))
  plan = pipeline_plan.report(_CONFIG.value, num_devices)  # "" without a pipeline
  if plan:
    print()
    print(plan)


def data(args: list[str]) -> None:
  """`vlmjax data build shapes --out DIR [--config FILE]` and `vlmjax data show shapes --data_dir DIR --out PNG`."""
  if len(args) != 2 or args[0] not in ("build", "show") or args[1] != "shapes":
    raise SystemExit("usage: vlmjax data build shapes --out DIR | vlmjax data show shapes --data_dir DIR --out PNG")
  import tensorflow_datasets as tfds

  from vlmjax.data import shapes

  if _OUT.value is None:
    raise SystemExit(f"vlmjax data {args[0]} shapes: --out is required")
  if args[0] == "build":
    tfds.disable_progress_bar()
    # An experiment config (`--config configs/shapes_tiny.py`) carries the data set's config as data.shapes.
    shapes.build(_OUT.value, _CONFIG.value.data.shapes if _CONFIG.value else shapes.get_config())
    print(f"shapes data set in {_OUT.value}")
  else:
    if _DATA_DIR.value is None:
      raise SystemExit("vlmjax data show shapes: --data_dir (where the data set was built) is required")
    source = shapes.load(_DATA_DIR.value, _SPLIT.value or "validation")
    shapes.render_grid([source[i] for i in range(min(16, len(source)))], _OUT.value)
    print(f"wrote {_OUT.value}")


def train(args: list[str]) -> None:
  """Trains from --config in --workdir, resuming it if it holds a run."""
  del args
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise SystemExit("vlmjax train: --config FILE and --workdir DIR are required")
  from vlmjax.eval import harness
  from vlmjax.parallel import distributed
  from vlmjax.train.trainer import train as run

  distributed.split_cpu(_CONFIG.value.cpu_devices)
  run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
      validate=harness.training_validation(_CONFIG.value, _WORKDIR.value))


def evaluate(args: list[str]) -> None:
  """Runs benchmarks on --workdir or --checkpoint; writes --out (results.json) and predictions beside it."""
  del args
  import json
  import os

  import jax

  from vlmjax import workdir as workdir_lib
  from vlmjax.eval import benchmarks, compare, harness, judge as judge_lib, registry, report as report_lib, retrieval
  from vlmjax.parallel import distributed

  path = _WORKDIR.value or _CHECKPOINT.value
  if path is None or _OUT.value is None:
    raise SystemExit("vlmjax eval: --workdir DIR (or --checkpoint PATH) and --out results.json are required")
  distributed.initialize_from_environment()  # each process answers its share of the questions (harness.evaluate)
  split = _SPLIT.value or benchmarks.SPLITS[0]
  if not _MAX_DROP.value >= 0:
    raise SystemExit(f"vlmjax eval: --max_drop must be 0 or more, got {_MAX_DROP.value}")
  try:
    baseline = report_lib.read_results_file(_BASELINE.value) if _BASELINE.value else None
  except (FileNotFoundError, ValueError) as error:
    raise SystemExit(f"vlmjax eval: --baseline: {error}") from error
  judge = judge_lib.Judge(_JUDGE.value) if _JUDGE.value else None
  try:
    if judge is not None:
      judge.check()  # an unreachable judge fails here, before the model loads
  except judge_lib.JudgeUnreachable as error:
    raise SystemExit(f"vlmjax eval: --judge: {error}") from error
  if _BENCHMARKS.value:
    names = _BENCHMARKS.value.split(",")
  else:
    step, why_not = retrieval.contrastive_checkpoint(path)
    names = list(benchmarks.NAMES) + (list(retrieval.BENCHMARKS) if step is not None else [])
    if step is None:
      print(f"vlmjax eval: shapes_retrieval skipped: {why_not}", file=sys.stderr)
  built_in = [name for name in names if name in benchmarks.NAMES or name in retrieval.BENCHMARKS]
  data_dir = _DATA_DIR.value
  if data_dir is None and os.path.exists(os.path.join(path, workdir_lib.CONFIG_FILE)):
    data_dir = workdir_lib.data_dir(path)
  if data_dir is None and built_in:
    raise SystemExit(f"vlmjax eval: --data_dir is required for {', '.join(built_in)} with a checkpoint that is not "
                     f"a vlmjax workdir")
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  try:
    for name in names:
      registry.get(name, split)  # unknown names and missing benchmark files fail before the model loads
    retrieval_names = [name for name in names if name in retrieval.BENCHMARKS]
    vlm = _load(path, "eval") if len(retrieval_names) < len(names) else None
    clip = retrieval.load_clip(path) if retrieval_names else None
    results = harness.evaluate(vlm, names, out_dir, data_dir, batch_size=_BATCH_SIZE.value, clip=clip,
                               split=split, judge=judge)
  except FileNotFoundError as error:
    raise SystemExit(f"vlmjax eval: {error}") from error
  if jax.process_index() != 0:  # process 0 holds every answer and writes the results
    return
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))
  if baseline is not None:
    fallen = compare.regressions(results, baseline, _MAX_DROP.value)
    if fallen:
      raise SystemExit(f"vlmjax eval: {len(fallen)} metrics fell by more than {_MAX_DROP.value} against "
                       f"{_BASELINE.value}:\n  " + "\n  ".join(fallen))
    print(f"vlmjax eval: no metric fell by more than {_MAX_DROP.value} against {_BASELINE.value}", file=sys.stderr)


def report(args: list[str]) -> None:
  """`vlmjax report RUN_DIR [RUN_DIR ...] --out report.md`: a Markdown page comparing evaluation runs."""
  if not args or _OUT.value is None:
    raise SystemExit("usage: vlmjax report RUN_DIR [RUN_DIR ...] --out report.md [--data_dir DIR] "
                     "[--baseline OLD/results.json]  (a run folder holds the results.json of `vlmjax eval`)")
  from vlmjax.eval.report import write_report

  try:
    write_report(args, _OUT.value, data_dir=_DATA_DIR.value, baseline=_BASELINE.value)
  except FileNotFoundError as error:
    raise SystemExit(f"vlmjax report: {error}") from error
  print(f"wrote {_OUT.value}")


def generate(args: list[str]) -> None:
  """Answers --prompt about --image with --checkpoint, printing the text as it is produced."""
  del args
  from PIL import Image

  if _CHECKPOINT.value is None or _IMAGE.value is None or _PROMPT.value is None:
    raise SystemExit("vlmjax generate: --checkpoint PATH, --image FILE and --prompt TEXT are required")
  try:
    image = Image.open(_IMAGE.value)
    image.load()
  except (OSError, ValueError) as error:
    raise SystemExit(f"vlmjax generate: {_IMAGE.value}: not a decodable image ({error})") from error
  vlm = _load(_CHECKPOINT.value, "generate")
  for piece in vlm.stream([image], _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                          temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value):
    print(piece, end="", flush=True)
  print()


def serve(args: list[str]) -> None:
  """Serves --checkpoint over an OpenAI-compatible HTTP API until SIGINT/SIGTERM."""
  del args
  import os

  from vlmjax.serve import server
  from vlmjax.serve.images import ImageLimits

  if _CHECKPOINT.value is None:
    raise SystemExit("vlmjax serve: --checkpoint PATH is required")
  limits = server.Limits(max_body_bytes=_MAX_BODY_BYTES.value, max_images=_MAX_IMAGES.value,
                         max_waiting=_MAX_WAITING.value,
                         images=ImageLimits(max_pixels=_MAX_IMAGE_PIXELS.value,
                                            max_request_pixels=_MAX_REQUEST_PIXELS.value))
  if _COMPILATION_CACHE.value:
    runtime.use_compilation_cache(_COMPILATION_CACHE.value)
  try:
    server.serve(_CHECKPOINT.value, host=_HOST.value, port=_PORT.value, num_slots=_SLOTS.value,
                 max_len=_MAX_LEN.value, api_key=_API_KEY.value or os.environ.get("VLMJAX_API_KEY"),
                 image_dir=_IMAGE_DIR.value, model_name=_MODEL_NAME.value, limits=limits,
                 load_options=_load_options(), metrics_need_key=_METRICS_NEED_KEY.value, docs=_DOCS.value,
                 warm_up=_WARM_UP.value, warm_up_image_sizes=_image_sizes(_WARM_UP_IMAGE_SIZES.value),
                 num_pages=_PAGES.value,
                 page_size=_PAGE_SIZE.value, prefix_caching=_PREFIX_CACHING.value,
                 prefill_chunk=_PREFILL_CHUNK.value or None, prefill_budget=_PREFILL_BUDGET.value or None)
  except FileNotFoundError as error:  # no such checkpoint, or one missing a file
    raise SystemExit(f"vlmjax serve: {error}") from error
  except server.EngineFailed as error:  # logged as it happened; a supervisor starts the server again
    raise SystemExit(f"vlmjax serve: {error}") from error
  except ValueError as error:  # a load option the model cannot take, a bad --image_dir
    raise SystemExit(f"vlmjax serve: {error}") from error


def quantize(args: list[str]) -> None:
  """`vlmjax quantize SRC OUT --quantize int8 [--dtype bfloat16] [--quantize_vision]`: SRC (a workdir or a Hugging
  Face directory) quantized once and written to OUT, which `vlmjax.load`, generate, eval and serve read as it is."""
  from vlmjax.infer import quantize as quantize_lib

  if len(args) != 2 or _QUANTIZE.value is None:
    raise SystemExit("usage: vlmjax quantize SRC OUT --quantize int8|int4[:GROUP]|w8a8 [--dtype bfloat16] "
                     "[--quantize_vision]")
  source, out = args
  vlm = _load(source, "quantize")
  try:
    quantize_lib.save_checkpoint(out, vlm.config, vlm.params, vlm.tokenizer, vlm.image_processor, vlm.eos_token_ids,
                                 vlm.pad_token_id, vlm.max_len, vlm.source)
  except ValueError as error:
    raise SystemExit(f"vlmjax quantize: {error}") from error
  print(f"wrote {out}: {quantize_lib.param_bytes(vlm.params) / 2**20:.1f} MiB of parameters "
        f"({quantize_lib.recorded(vlm.config).describe()})")


def export_checkpoint(checkpoint: str, out: str, adapters: bool = False) -> str:
  """Writes `checkpoint` (a workdir or a Hugging Face directory) for Hugging Face into `out`: the model, a lora
  run's adapters merged, as a directory that transformers' `from_pretrained` loads (tokenizer, image processor and
  end tokens included); with `adapters`, a lora run's adapters and projector alone, which `peft` loads onto the base
  model (`PeftModel.from_pretrained(base, out)`). Returns what was written, in a line for the user. ValueError for
  what a Hugging Face directory or PEFT cannot express."""
  import os

  import jax

  import vlmjax
  from vlmjax import api, workdir as workdir_lib
  from vlmjax.interop import hf, peft
  from vlmjax.models import quant
  from vlmjax.train import adapters as adapters_lib

  if not adapters:
    vlm = vlmjax.load(checkpoint, dtype="float32")  # the weights as trained, not a GPU's bfloat16 copy of them
    # A QLoRA run's base layers without an adapter stay quantized after the merge: written dequantized, the model
    # computes what the adapters were trained against.
    params = jax.tree.map(lambda leaf: quant.dequantize(leaf) if isinstance(leaf, quant.QuantizedKernel) else leaf,
                          vlm.params, is_leaf=lambda leaf: isinstance(leaf, quant.QuantizedKernel))
    hf.save_pretrained(out, vlm.config, params, vlm.tokenizer, vlm.image_processor, eos_token_ids=vlm.eos_token_ids,
                       pad_token_id=vlm.pad_token_id, max_len=vlm.max_len)
    return f"wrote {out}: {vlm.source} as a Hugging Face directory"
  config = workdir_lib.read_config(checkpoint) if workdir_lib.is_workdir(checkpoint) else None
  if config is None or not workdir_lib.is_lora_run(config):
    raise ValueError(f"--adapters: {checkpoint} is not a lora run (train.stages=lora) and has no adapters; export "
                     f"its whole model without --adapters")
  trained, step = api.lora_trained(checkpoint)  # the adapters and projector alone: no base is read
  base = os.path.abspath(config.train.init_from)
  peft.save_adapters(out, config, trained, adapters_lib.lora_config(config), base)
  notes = []
  if not hf.is_hf_checkpoint(base):
    notes.append(f"the base {base} is a vlmjax workdir: PEFT loads the adapters onto a transformers model, so export "
                 f"the base too (vlmjax export --checkpoint {base} --out BASE_DIR) and load them onto that")
  if config.lora.get("quantize", ""):
    notes.append(f"the adapters were trained on the base quantized to {config.lora.quantize} (QLoRA); PEFT applies "
                 f"them to the base as it is loaded, so a float base gives logits that differ from vlmjax's by the "
                 f"quantization error")
  return "\n".join([f"wrote {out}: the adapters of {checkpoint} step {step} for PEFT, on {base}",
                    *(f"note: {note}" for note in notes)])


def export(args: list[str]) -> None:
  """`vlmjax export --checkpoint PATH --out DIR [--adapters]`: a Hugging Face directory that transformers loads (a
  lora run's adapters merged), or with --adapters a lora run's adapters alone in PEFT's layout."""
  del args
  if _CHECKPOINT.value is None or _OUT.value is None:
    raise SystemExit("usage: vlmjax export --checkpoint PATH --out DIR [--adapters]")
  try:
    print(export_checkpoint(_CHECKPOINT.value, _OUT.value, adapters=_ADAPTERS.value))
  except FileNotFoundError as error:
    raise SystemExit(f"vlmjax export: {error}") from error


COMMANDS = {"summarize": summarize, "data": data, "train": train, "eval": evaluate, "report": report,
            "generate": generate, "serve": serve, "quantize": quantize, "export": export}


def main(argv: list[str] | None = None) -> None:
  if argv is None:  # the program itself, not a call from Python: its process may still be set up
    runtime.exec_with_huge_pages()
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"usage: vlmjax {{{','.join(COMMANDS)}}} [flags]   (vlmjax COMMAND --help for its flags)")
  command = argv.pop(1)
  if "--help" in argv[1:] or "-h" in argv[1:]:
    print(f"vlmjax {command}: {COMMANDS[command].__doc__}\n\n{FLAGS.module_help(sys.modules[__name__])}")
    if command == "eval":
      from vlmjax.eval import registry

      print("\nBenchmark files (--benchmarks [NAME=]KIND:ARG:ARG...):")
      print("\n".join(f"  {kind}:{file_kind.usage}" for kind, file_kind in registry.KINDS.items()))
    return
  # config_flags registers the `--config.a.b` override flags from sys.argv, so it must hold what we parse.
  sys.argv = argv
  try:
    positional = FLAGS(argv)
  except flags.Error as error:
    raise SystemExit(f"vlmjax {command}: {error}") from error
  try:
    COMMANDS[command](positional[1:])
  except ValueError as error:  # a config or an argument that cannot work: the message says what to change
    raise SystemExit(f"vlmjax {command}: {error}") from error


if __name__ == "__main__":
  main()
