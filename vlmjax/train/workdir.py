"""What a training workdir holds besides checkpoints, and loading a trained model back from it.

    workdir/config.json              the config the run used (a resumed run must match it)
    workdir/tokenizer.json, tokenizer_config.json, preprocessor_config.json   read as a Hugging Face dir is
    workdir/checkpoints/<step>/      orbax: train state + data-iterator state
    workdir/metrics.jsonl            one row per logged step
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import ml_collections

CONFIG_FILE = "config.json"
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """'key: saved -> new' for every key whose value differs (tuples and lists compare equal)."""
  normalize = lambda c: _flatten(json.loads(c.to_json_best_effort()))
  old, current = normalize(saved), normalize(new)
  return [f"{key}: {old.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}"
          for key in sorted(set(old) | set(current)) if old.get(key) != current.get(key)]


def write_or_check_config(workdir: str, config: ml_collections.ConfigDict, allow_change: bool) -> None:
  """Writes config.json into a new workdir; in an existing one, refuses a different config unless allowed."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      differences = config_differences(config_from_json(f.read()), config)
    if differences and not allow_change:
      raise ValueError(f"{workdir} was trained with another config; these keys differ (saved -> new):\n  "
                       + "\n  ".join(differences)
                       + "\nUse another --workdir, or pass --allow_config_change to resume with the new config.")
  os.makedirs(workdir, exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  os.replace(temporary, path)  # atomic: never a half-written config


def copy_model_files(source_dir: str, workdir: str) -> None:
  """The tokenizer and image-processor files, so that `vlmjax.load(workdir)` reads them as from a HF dir."""
  for name in MODEL_FILES:
    source = os.path.join(source_dir, name)
    if os.path.exists(source):
      shutil.copyfile(source, os.path.join(workdir, name))


def is_workdir(path: str) -> bool:
  """A training workdir: its config.json and a checkpoints folder."""
  return os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run used."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no {CONFIG_FILE}: it is neither a vlmjax workdir nor a Hugging Face "
                            f"model directory")
  with open(path) as f:
    return config_from_json(f.read())


def data_dir(workdir: str, config: ml_collections.ConfigDict | None = None) -> str:
  """Where a run's shapes data set is built and read: its config's data.dir, else <workdir>/data. config: the
  run's config (default: the one saved in the workdir)."""
  config = read_config(workdir) if config is None else config
  return config.get("data", {}).get("dir") or os.path.join(workdir, "data")


def facade(config: ml_collections.ConfigDict, params, model_dir: str):
  """A `vlmjax.VLM` of `params` with the tokenizer and image processor saved in model_dir (a workdir, or the
  data set's tokenizer folder during training); the tokenizer's end token stops generation."""
  from vlmjax.api import VLM
  from vlmjax.data.images import ImageProcessor
  from vlmjax.data.tokenizer import Tokenizer

  tokenizer = Tokenizer.from_directory(model_dir)
  return VLM(config=config, params=params, tokenizer=tokenizer, image_processor=ImageProcessor.from_directory(
      model_dir), eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)


def load_model(workdir: str):
  """The trained model of a workdir (its latest checkpoint) as a `vlmjax.VLM`."""
  from vlmjax.models.summary import abstract_params
  from vlmjax.models.vlm import VLMConfig
  from vlmjax.train.checkpoint import Checkpointer

  config = read_config(workdir)
  checkpointer = Checkpointer(workdir, asynchronous=False)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir} holds no finished checkpoint yet")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nn.meta.unbox(abstract_params(VLMConfig.from_dict(config.model))))
  params = checkpointer.restore_params(step, abstract)
  checkpointer.close()
  return facade(config, params, workdir)
