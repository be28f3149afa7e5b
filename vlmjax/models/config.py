"""Model configs: small frozen dataclasses, validated when they are built.

A config file (`configs/*.py`) describes a model as a `ml_collections.ConfigDict`; `from_dict` turns a section of
it into one of these dataclasses. Unknown keys and sizes that cannot work fail here, at construction, with a
message that names the field and the numbers.
"""

import dataclasses
from typing import Any, Mapping, TypeVar

import jax.numpy as jnp

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Base of the model configs: construction from a mapping and shared checks."""

  @classmethod
  def from_dict(cls: type[C], values: Mapping[str, Any], where: str = "") -> C:
    """Builds the config from a mapping (a ConfigDict section); `where` prefixes field names in errors."""
    where = where or cls.__name__
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**dict(values))

  def replace(self: C, **changes: Any) -> C:
    return dataclasses.replace(self, **changes)


# Keys of a model section that apply to every tower (vision, decoder, text) of a two-tower model, unless the
# tower's own section sets them (e.g. a bfloat16 language model over a float32 vision tower).
SHARED_KEYS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


# Keys of a pretraining stage's config section (`contrastive`, `classify`) that set how the stage trains, not its
# model: the `optim` keys it may set for itself (unset or None: optim's), its batch and its labels.
PRETRAINING_OPTIM_KEYS = ("optimizer", "learning_rate", "muon_learning_rate")
PRETRAINING_TRAIN_KEYS = ("batch_size", "position_bins") + PRETRAINING_OPTIM_KEYS


def pretraining_section(config: Mapping[str, Any], stage: str) -> dict:
  """The model section of the vision-pretraining stage `stage` of a run config: the run's `model.vision` and the
  SHARED_KEYS of `model`, with the stage's own section (`config[stage]`) less its PRETRAINING_TRAIN_KEYS."""
  if stage not in config:
    raise ValueError(f"train.stages has a {stage!r} stage but the config has no `{stage}` section: see "
                     f"configs/shapes_tiny.py")
  shared = {key: config["model"][key] for key in SHARED_KEYS if key in config["model"]}
  model_keys = {key: value for key, value in config[stage].items() if key not in PRETRAINING_TRAIN_KEYS}
  return {**shared, "vision": config["model"]["vision"], **model_keys}


def build_towers(values: Mapping[str, Any], towers: Mapping[str, type[ModelConfig]], where: str) -> dict:
  """A copy of a model section with each tower section (e.g. `vision`) built as its config class and the
  SHARED_KEYS moved into every tower that does not set them itself."""
  values = dict(values)
  shared = {key: values.pop(key) for key in SHARED_KEYS if key in values}
  for tower, tower_cls in towers.items():
    if tower not in values:
      raise ValueError(f"{where}: missing section {tower!r}")
    values[tower] = tower_cls.from_dict({**shared, **dict(values[tower])}, f"{where}.{tower}")
  return values


def check_divides(divisor: int, dividend: int, message: str) -> None:
  """Raises ValueError(message) unless `divisor` divides `dividend`."""
  if divisor <= 0 or dividend % divisor:
    raise ValueError(f"{message} ({dividend} is not a multiple of {divisor})")


def check_positive(config: ModelConfig, where: str, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")


def check_choice(value: Any, choices: tuple, field: str) -> None:
  if value not in choices:
    raise ValueError(f"{field} must be one of {list(choices)}, got {value!r}")


def dtype(name: str) -> jnp.dtype:
  """A dtype from its config name ('float32', 'bfloat16', ...)."""
  try:
    return jnp.dtype(name)
  except TypeError as error:
    raise ValueError(f"unknown dtype {name!r} (use e.g. 'float32' or 'bfloat16')") from error
