"""The sections every experiment config shares: seed, mesh, sharding rules and the training basics."""

import ml_collections
from ml_collections import config_dict

from vlmjax.parallel.mesh import LOGICAL_RULES


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Device mesh; the product of the three is the device count, and -1 means "the rest of the devices".
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = LOGICAL_RULES
  # XLA devices `vlmjax train` makes of this process's CPU (`distributed.split_cpu`); 0: JAX's default.
  config.cpu_devices = 0
  # The model: `vision` and `decoder` sections come from `sizes`; these are the defaults of the rest.
  config.model = ml_collections.ConfigDict(dict(
      projector="mlp2x_gelu",
      vision_feature_layer=-2,
      vision_feature_select="default",
      image_token_merge=1,
      prefix_lm=False,
      image_position_embedding="none",
      image_position_scale=0.0,
      dtype="float32",  # compute dtype; "bfloat16" for mixed precision
      param_dtype="float32",  # master weights
      scan_layers=True,
      remat_policy="none",  # or "full", or a jax.checkpoint_policies name
  ))
  config.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, log_every=50, checkpoint_every=500, keep_checkpoints=2,
      stages="full",  # a chain of stages with fractions of train.steps, e.g. "align:0.2,finetune:0.8"
      init_from="",  # a workdir whose latest parameters the run starts from
      validate_every=0,  # steps between validations (exact-match VQA accuracy); 0: only at the end
      validation_questions=256,  # 0: no validation
  ))
  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw",  # or "muon": Muon on the hidden layers' kernels, Adam on the rest (`optim.muon_update`)
      learning_rate=1e-3, warmup_steps=100, end_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      muon_learning_rate=0.02,  # Muon's peak rate, on the same warmup and decay as learning_rate
      grad_clip=1.0, accumulation_steps=1,
      vision_learning_rate=config_dict.placeholder(float),  # the vision tower's own peak rate; None: learning_rate
  ))
  return config
