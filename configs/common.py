"""The sections every experiment config shares: seed, mesh, sharding rules and the training basics."""

import ml_collections
from ml_collections import config_dict

from vlmjax.models import lora
from vlmjax.parallel.mesh import LOGICAL_RULES


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Device mesh; the product of the four is the device count, and -1 means "the rest of the devices". pipeline > 1
  # runs the decoder's layers as that many stages (vlmjax/parallel/pipeline.py; with train.microbatches).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1))
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
      # The pipeline's (mesh.pipeline > 1): its bubble is (pipeline - 1) / (microbatches + pipeline - 1).
      microbatches=1,
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


def finetune_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data, lora and optimizer settings of finetuning a Hugging Face checkpoint (`train.init_from`), as LLaVA-1.5's
  recipe runs them (scripts/v1_5/finetune.sh and finetune_lora.sh): AdamW at 2e-5 with 3% warmup and a cosine decay
  to 0, no weight decay, 2048 tokens; LoRA rank 128, alpha 256, dropout 0.05 at 2e-4 with the projector at 2e-5."""
  config.data = ml_collections.ConfigDict(dict(
      # Comma-separated KIND:JSON:IMAGE_DIR[:WEIGHT] (vlmjax/data/sources.py): llava (instruction conversations),
      # llava_pretrain (LCS-558K captions, LLaVA's plain format), coco (COCO captions).
      sources="",
      length=2048,  # tokens per row; longer conversations are skipped and counted
      packing=False,  # several conversations per row (vlmjax/data/packing.py)
      num_workers=0,  # processes decoding images
  ))
  config.lora = ml_collections.ConfigDict(dict(
      rank=128, alpha=256.0, dropout=0.05,
      targets=lora.DEFAULT_TARGETS,  # every linear layer of the language model but its output head
      quantize="",  # QLoRA: "int8" or "int4" stores the frozen base's layers in low bits
  ))
  config.train.update(stages="finetune", steps=1000, batch_size=128, validation_questions=0, checkpoint_every=500,
                      log_every=10)
  config.optim.update(learning_rate=2e-5, warmup_steps=30, end_ratio=0.0, b2=0.999, weight_decay=0.0,
                      projector_learning_rate=config_dict.placeholder(float))  # the lora stage's; None: learning_rate
  return config
