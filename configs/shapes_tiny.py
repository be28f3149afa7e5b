"""A VLM of a few million parameters for the synthetic shapes data set, sized to train on a laptop CPU.

    vlmjax summarize --config configs/shapes_tiny.py
    vlmjax train --config configs/shapes_tiny.py --workdir /tmp/shapes
"""

from ml_collections import config_dict

from configs import common, sizes


def get_config(arg: str | None = None):
  del arg
  config = common.base_config()
  config.model.vision = sizes.vit("Ti/16", variant="siglip", image_size=64, patch_size=8, width=128, depth=4,
                                  num_heads=4, mlp_dim=512)
  config.model.decoder = sizes.lm("tiny", vocab_size=512, width=256, depth=4, num_heads=4, num_kv_heads=2,
                                  mlp_dim=768)
  config.model.projector = "mlp2x_gelu"
  config.model.image_token_id = 3
  # None: the ViT's final output, after its post-LayerNorm.
  config.model.vision_feature_layer = config_dict.placeholder(int)
  config.model.vision_feature_select = "full"
  config.train.batch_size = 32
  return config
