"""PaliGemma-3B at 224 px: SigLIP So400m/14, one linear projector, Gemma-2B with 257216 tokens, prefix-LM.

    vlmjax train --config configs/paligemma_3b_224.py:/models/paligemma-3b-pt-224 --workdir DIR \\
        --config.data.sources=llava:JSON:IMAGE_DIR [--config.train.stages=lora]

Published size: 2.92 B parameters. `vlmjax summarize --config configs/paligemma_3b_224.py`
"""

from ml_collections import config_dict

from configs import common, sizes
from vlmjax.interop import hf


def get_config(arg: str | None = None):
  """arg: the checkpoint's Hugging Face directory to finetune (its weights, tokenizer, chat template, image
  processor); none: a random start."""
  config = common.finetune_sections(common.base_config())
  config.model.vision = sizes.vit("So400m/14", variant="siglip", image_size=224)
  config.model.decoder = sizes.lm("gemma-2b", vocab_size=257216)
  config.model.projector = "linear"
  config.model.image_token_id = 257152
  # None: SigLIP's final output after its post-LayerNorm (256 image tokens).
  config.model.vision_feature_layer = config_dict.placeholder(int)
  config.model.vision_feature_select = "full"
  config.model.prefix_lm = True  # bidirectional attention over image + prompt
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.mesh.data, config.mesh.fsdp = 1, -1
  if arg:
    config.train.init_from = arg
    config.generation = hf.generation_settings(arg)
  return config
