"""LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, two-layer GELU projector, Llama-2-7B (Vicuna) with 32064 tokens.

    vlmjax train --config configs/llava_1_5_7b.py:/models/llava-1.5-7b-hf --workdir DIR \\
        --config.data.sources=llava:JSON:IMAGE_DIR [--config.train.stages=lora]

Published size: 7.06 B parameters. `vlmjax summarize --config configs/llava_1_5_7b.py --config.mesh.fsdp=-1`
"""

from configs import common, sizes
from vlmjax.interop import hf


def get_config(arg: str | None = None):
  """arg: the checkpoint's Hugging Face directory to finetune (its weights, tokenizer, chat template, image
  processor); none: a random start."""
  config = common.finetune_sections(common.base_config())
  config.model.vision = sizes.vit("L/14", variant="clip", image_size=336)
  config.model.decoder = sizes.lm("llama2-7b", vocab_size=32064)
  config.model.projector = "mlp2x_gelu"
  config.model.image_token_id = 32000
  config.model.vision_feature_layer = -2  # the penultimate layer, as LLaVA
  config.model.vision_feature_select = "default"  # drop the class token: 576 image tokens
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.mesh.data, config.mesh.fsdp = 1, -1
  if arg:
    config.train.init_from = arg
    config.generation = hf.generation_settings(arg)
  return config
