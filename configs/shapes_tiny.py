"""A VLM of a few million parameters for the synthetic shapes data set, sized to train on a laptop CPU.

    vlmjax summarize --config configs/shapes_tiny.py
    vlmjax train --config configs/shapes_tiny.py --workdir /tmp/shapes
"""

import ml_collections
from ml_collections import config_dict

from configs import common, sizes
from vlmjax.data import shapes


def get_config(arg: str | None = None):
  del arg
  config = common.base_config()
  # A convolutional stem: the shapes' outlines are learned in far fewer steps than by a linear patch embedding.
  # Position embeddings started at the 2-D sine-cosine table: from the small random start, the classify stage
  # (which never needs position) left no object's position in the tower's output (probe R² 0.90 against -0.04,
  # experiments/shapes_tiny/probe_positions.py), so "left of" and boxes could not be read from it.
  # The tower computes in the model's dtype, bfloat16, as the language model does. It was faster in float32 (the
  # classify step took 0.31 s against 0.37 s) until the bias gradients were summed by a matmul (`matmul.add_bias`):
  # now the classify step takes 0.162-0.182 s against 0.203-0.261 s in float32, the finetune step 0.113-0.138
  # against 0.151-0.175 s (260-step runs, twice each), and the main job of seeds 0 / 1 answers shapes_vqa 0.974 /
  # 0.973 (float32: 0.984 / 0.966, session 18; session 19).
  config.model.vision = sizes.vit("Ti/16", variant="siglip", image_size=64, patch_size=8, width=128, depth=4,
                                  num_heads=4, mlp_dim=512, stem="conv",
                                  position_embedding_init="sincos2d")
  # The language model of this tiny vocabulary learns as much per step at width 128 as at 256, for 1/4 the cost.
  # Every head has its own keys and values (4 of 4, not 2 shared): the lookups that read an image token's colour
  # and the one that reads its position (relation questions, below) then no longer compete for two value heads
  # (session 12, experiments/shapes_tiny/README.md).
  config.model.decoder = sizes.lm("tiny", vocab_size=512, width=128, depth=4, num_heads=4, num_kv_heads=4,
                                  mlp_dim=384)
  # The language model computes in bfloat16 (float32 master weights), its matmuls bfloat16 x bfloat16 -> float32
  # in the forward and backward pass (`matmul.contract`, `dot_attention`): the finetune step takes 0.199 s against
  # 0.286 s when XLA upcast them (session 16). Both towers' layers are unrolled (the finetune step took 0.237 s
  # against 0.303 s in float32 with scanned layers, session 7), and the steps saved go to more training.
  config.model.dtype = "bfloat16"
  # One XLA device over both cores of the 2-core machine the main job is sized for. Two devices, one per core with
  # the batch split over them, were faster while every step faulted its temporaries in 4 KiB pages (session 16:
  # finetune 0.190 s against 0.196 s); with huge pages (`vlmjax/runtime.py`) one device takes 0.150 s against
  # 0.162 s, and the classify step 0.216 s on either (`distributed.split_cpu`; session 17).
  config.cpu_devices = 1
  config.model.scan_layers = False
  config.model.projector = "mlp2x_gelu"
  config.model.image_token_id = 3
  # None: the ViT's final output, after its post-LayerNorm.
  config.model.vision_feature_layer = config_dict.placeholder(int)
  config.model.vision_feature_select = "default"
  config.model.image_token_merge = 2  # 2 x 2 patches per image token: 16 tokens of 16 x 16 pixels
  # Where each image token lies, made as strong as what it shows: a learned table added to the image tokens,
  # started at the 2-D sine-cosine table, centred and scaled to a root mean square of 1.5 (session 9).
  config.model.image_position_embedding = "sincos2d"
  config.model.image_position_scale = 1.5
  config.data = ml_collections.ConfigDict(dict(
      dir="",  # where the shapes data set is built if missing; empty: <workdir>/data
      length=224,  # tokens per example: 16 image tokens + up to ~207 text tokens of ~15 turns, padded
      questions_per_type=3,  # VQA questions of each type drawn afresh each time an image is seen (0: the record's)
      # Two training-only questions per view of where an object lies against the image's centre, asked as
      # relation questions are, with the object named last ("Is the centre to the left or to the right of the red
      # circle?"; sessions 9 and 11). They teach the lookup that relation questions need: with them and the
      # table above, the main job of seeds 0, 1, 2 answers relation questions 0.875 / 0.740 / 0.759 (shapes_vqa
      # 0.905 / 0.850 / 0.837) against 0.507 for seed 0 without them (0.881; session 12).
      position_questions=2,
      position_centre_first=True,  # those questions name the centre first and the object last
      # The loss weight of the prompt's text (answers weigh 1, image placeholders 0). The questions are drawn
      # from the image, so predicting them is image-grounded too; 0.1 moved the main job within the seed-to-seed
      # spread (seeds 0 / 1: 0.896 / 0.847 against 0.886 / 0.844), 0.3 took the answers' share of the loss
      # (0.805 / 0.779; session 14).
      prompt_loss_weight=0.0,
      shapes=shapes.get_config().to_dict(),
  ))
  # The contrastive stage's dual tower (used when train.stages names it): this vision tower, a small text tower.
  config.contrastive = ml_collections.ConfigDict(dict(
      text=dict(vocab_size=512, context_length=40, width=128, depth=2, num_heads=4, mlp_dim=512,
                activation="gelu"),
      embed_dim=128, pooling="mean", loss="sigmoid", temperature_init=10.0, bias_init=-10.0, batch_size=128,
      learning_rate=config_dict.placeholder(float),  # None: optim.learning_rate
  ))
  # The classify stage (when train.stages names it): this vision tower with a head on each patch's object.
  # position_bins=4 adds two label groups, the quarter of the image across and down that holds each patch's
  # object's box centre. They keep positions in the language model's image tokens, which relation questions need
  # after about 1500 finetune steps; within this recipe's 1270 they cost accuracy (shapes_vqa 0.816 / 0.745 for
  # seeds 0 / 1 against 0.851 / 0.834: shape is learned later), so the 10-minute recipe leaves them out.
  # Rates: Adam's 3e-3 (a tower learning from scratch stands more than the language model's 1e-3) and Muon's 0.02.
  config.classify = ml_collections.ConfigDict(dict(head_mlp_dim=256, batch_size=64, position_bins=0,
                                                   optimizer=config_dict.placeholder(str),  # None: optim's
                                                   learning_rate=3e-3, muon_learning_rate=0.02))
  # The recipe: the vision tower first learns what each patch shows (classify: no language model, cheap; 200
  # steps at batch 64), then the projector and language model learn the conversations over the frozen tower
  # (1800 steps at batch 16: twice the updates of batch 32 for the same time, and more accurate). Both stages
  # train their hidden layers' kernels with Muon (`optim.muon_update`), the rest with Adam. Which shape lies under
  # a patch is learned suddenly: under AdamW around step 300 (the tower names a patch's shape right 0.87 of the
  # time after 300 steps, 0.976 after 380), under Muon by step 150 (0.994 at step 200, in a 380-step schedule).
  # Muon's finetune stage learns the lookups into the image in fewer steps: it is below AdamW's final training
  # loss by step 850 of 1270, and the main job of seeds 0 / 1 / 2 answers shapes_vqa 0.971 / 0.906 / 0.877
  # against 0.886 / 0.844 / 0.809 with AdamW (session 15, experiments/shapes_tiny/README.md). A Muon step costs
  # about 10% more (the Newton-Schulz iterations: 25 ms per update). 1150 finetune steps instead of 1270 keep seed
  # 0 (0.963) but drop seed 2 to 0.786. Once the finetune step cost 0.2 s instead of 0.29 (session 16), 1800 steps
  # fit the same time and lift seeds 1 / 2 from 0.871 / 0.846 to 0.957 / 0.927.
  # Sized for the README's main job: under 10 minutes on a 2-core CPU. Relation questions ("Is the X to the left
  # or to the right of the Y?") go on rising after this recipe stops: 4000 finetune steps (session 8: AdamW, 2 KV
  # heads, the raw-scale table, no position questions and --config.train.steps=4380
  # --config.train.stages=classify:0.086758,finetune --config.classify.position_bins=4, about 20 minutes) gave
  # shapes_vqa 0.960, relation 0.902 (experiments/shapes_tiny/README.md).
  # A checkpoint every 200 steps (about a minute): each one slows the next steps by about a second in all.
  config.train.update(steps=2000, stages="classify:0.1,finetune", batch_size=16, log_every=10,
                      checkpoint_every=200)
  # Muon at 0.005 left the finetune stage's training loss lower than at 0.02 from step 400 on (0.155 against 0.165
  # over its last 70 steps), for the same shapes_vqa (0.954 / 0.952, seed 0).
  config.optim.update(learning_rate=1e-3, warmup_steps=20, optimizer="muon", muon_learning_rate=0.005)
  return config
