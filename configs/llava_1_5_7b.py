"""LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, two-layer GELU projector, Llama-2-7B (Vicuna) with 32064 tokens.

Published size: 7.06 B parameters. `vlmjax summarize --config configs/llava_1_5_7b.py --config.mesh.fsdp=-1`
"""

from configs import common, sizes


def get_config(arg: str | None = None):
  del arg
  config = common.base_config()
  config.model.vision = sizes.vit("L/14", variant="clip", image_size=336)
  config.model.decoder = sizes.lm("llama2-7b", vocab_size=32064)
  config.model.projector = "mlp2x_gelu"
  config.model.image_token_id = 32000
  config.model.vision_feature_layer = -2  # the penultimate layer, as LLaVA
  config.model.vision_feature_select = "default"  # drop the class token: 576 image tokens
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.mesh.data, config.mesh.fsdp = 1, -1
  return config
