"""A VLM of a few million parameters for the synthetic shapes data set, sized to train on a laptop CPU.

    vlmjax summarize --config configs/shapes_tiny.py
    vlmjax train --config configs/shapes_tiny.py --workdir /tmp/shapes

The experiments the comments name (date and short name) are in experiments/shapes_tiny/README.md.
"""

import ml_collections
from ml_collections import config_dict

from configs import common, sizes
from vlmjax.data import shapes
from vlmjax.models import lora


def get_config(arg: str | None = None):
  del arg
  config = common.base_config()
  # A convolutional stem: the shapes' outlines are learned in far fewer steps than through a linear patch embedding
  # (2026-12-01 classify-stage).
  # Position embeddings start at the 2-D sine-cosine table: from a small random start the tower keeps no object's
  # position, so "left of" and boxes cannot be read from it (probe R² 0.90 against -0.04; 2026-12-02 positions-lost).
  # The tower computes in the model's dtype, bfloat16: with bias gradients summed by a matmul its steps are faster
  # than in float32, for answers as good (seeds 0 / 1: 0.974 / 0.973 against 0.984 / 0.966; 2026-12-05
  # flat-allreduce).
  config.model.vision = sizes.vit("Ti/16", variant="siglip", image_size=64, patch_size=8, width=128, depth=4,
                                  num_heads=4, mlp_dim=512, stem="conv",
                                  position_embedding_init="sincos2d")
  # At width 128 the language model of this tiny vocabulary learns about as much per step as at 256, for 1/4 the
  # cost (2026-12-02 per-patch). Every query head has its own keys and values, so that the lookups of an image
  # token's colour and of its position do not share two value heads (2026-12-04 kv-heads).
  config.model.decoder = sizes.lm("tiny", vocab_size=512, width=128, depth=4, num_heads=4, num_kv_heads=4,
                                  mlp_dim=384)
  # bfloat16 compute over float32 master weights, every matmul bfloat16 x bfloat16 -> float32 forward and backward
  # (`matmul.contract`, `dot_attention`), the only form XLA's CPU backend runs in bfloat16 (2026-12-05 bf16-matmuls).
  config.model.dtype = "bfloat16"
  # One XLA device over both cores: with huge pages (`vlmjax/runtime.py`) the main job's steps are as fast or faster
  # than on two devices, one per core (finetune 0.150 s against 0.162 s; 2026-12-05 huge-pages).
  config.cpu_devices = 1
  # Unrolled layers: faster steps than scanned ones on the CPU (2026-12-02 classify-380).
  config.model.scan_layers = False
  config.model.projector = "mlp2x_gelu"
  config.model.image_token_id = 3
  # None: the ViT's final output, after its post-LayerNorm.
  config.model.vision_feature_layer = config_dict.placeholder(int)
  config.model.vision_feature_select = "default"
  # 2 x 2 patches per image token: 16 tokens of 16 x 16 pixels, as accurate as 64 tokens and a third cheaper per
  # step (2026-12-02 per-patch).
  config.model.image_token_merge = 2
  # Where each image token lies, made as strong as what it shows: a learned table added to the image tokens, started
  # at the 2-D sine-cosine table, centred and scaled to a root mean square of 1.5 (2026-12-02 position-scale).
  config.model.image_position_embedding = "sincos2d"
  config.model.image_position_scale = 1.5
  config.data = ml_collections.ConfigDict(dict(
      dir="",  # where the shapes data set is built if missing; empty: <workdir>/data
      length=224,  # tokens per example: 16 image tokens + up to ~207 text tokens of ~15 turns, padded
      questions_per_type=3,  # VQA questions of each type drawn afresh each time an image is seen (0: the record's)
      # Two training-only questions per view of where an object lies against the image's centre, with the object
      # named last as relation questions name it ("Is the centre to the left or to the right of the red circle?").
      # With them and the table above relation questions leave chance: 0.875 against 0.507 for seed 0
      # (2026-12-03 centre-first, 2026-12-04 kv-heads).
      position_questions=2,
      position_centre_first=True,  # those questions name the centre first and the object last
      # Questions of an object's size per view ("What size is the red circle?"), a task the main job never trains:
      # tools/lora_demo.py teaches it to the trained model with a lora or finetune run (2026-12-06 lora-size).
      size_questions=0,
      # The prompt's text stays out of the loss (answers weigh 1, image placeholders 0): at 0.1 the main job moved
      # within the seed-to-seed spread, at 0.3 it lost 0.06-0.08 (2026-12-04 zen5-host).
      prompt_loss_weight=0.0,
      other_turns=1,  # turns of another task (caption, POPE, multiple choice, grounding) per view
      # Two such turns, or the others opening the conversation, did not teach boxes; opening it, they cost VQA
      # (0.79 against 0.98: VQA was never the first turn, as evaluation asks it; 2026-12-05 held-out).
      other_turns_first=False,
      # Multiple-choice turns answered with the option's text ("red"), which the matching rules place by the option
      # it names: CircularEval 0.973 against 0.000 for letters, which the model never learns to look up in the
      # 10 minutes, written alone or after the text ("red, B": the text right 0.968, the letter B 95% of the time;
      # 2026-12-05 held-out). "letter" or "text_letter" train those forms.
      choice_answer="text",
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
  # position_bins=4 adds the quarter of the image across and down that holds each patch's object's box centre: it
  # helps relation only after about 1500 finetune steps and costs shape within this recipe's (2026-12-02
  # relation-long). Rates: Adam's 3e-3 (a tower learning from scratch stands more than the language model's 1e-3)
  # and Muon's 0.02.
  config.classify = ml_collections.ConfigDict(dict(head_mlp_dim=256, batch_size=64, position_bins=0,
                                                   optimizer=config_dict.placeholder(str),  # None: optim's
                                                   learning_rate=3e-3, muon_learning_rate=0.02))
  # The lora stage (`train.stages=lora`, `train.init_from=<a trained workdir>`): adapters on every linear layer of
  # the language model, trained with the projector. Rank 1 keeps them and the projector (84k) under 5% of the model
  # (94,464 of 1,979,936): at 10x full finetuning's rate it taught the main job's model size questions in 400 steps,
  # 0.990 against full finetuning's 0.992, with 0.72 MiB of optimizer state against 8.15 (tools/lora_demo.py;
  # 2026-12-06 lora-size). alpha / rank, the adapters' scale, is 2 as PEFT's usual settings have it.
  config.lora = ml_collections.ConfigDict(dict(rank=1, alpha=2.0, dropout=0.0, targets=lora.DEFAULT_TARGETS,
                                               quantize=""))  # "int8" / "int4": QLoRA's low-bit base
  # The recipe, sized for the README's main job (under 10 minutes on a 2-core CPU): the vision tower learns what
  # each patch shows (classify: no language model, cheap; 200 steps at batch 64), then the projector and language
  # model learn the conversations over the frozen tower (1800 steps at batch 16: twice the updates of batch 32 in
  # the same time, and more accurate; 2026-12-02 per-patch). 1800 finetune steps put every seed above 0.92
  # (2026-12-05 bf16-matmuls).
  # Both stages train their hidden layers' kernels with Muon (`optim.muon_update`), the rest with Adam: the tower
  # learns its shapes in 200 steps instead of 380, and the main job of seeds 0 / 1 / 2 answers 0.971 / 0.906 / 0.877
  # against AdamW's 0.886 / 0.844 / 0.809 (2026-12-04 muon).
  # Relation questions go on rising after the recipe stops: 4000 finetune steps (about 20 minutes) gave shapes_vqa
  # 0.960, relation 0.902 (2026-12-02 relation-long).
  # A checkpoint every 200 steps: each one slows the next steps by about a second in all (2026-12-04 zen5-host).
  config.train.update(steps=2000, stages="classify:0.1,finetune", batch_size=16, log_every=10,
                      checkpoint_every=200)
  # Muon at 0.005 ends the finetune stage at a lower training loss than at 0.02, for the same shapes_vqa
  # (2026-12-04 muon).
  config.optim.update(learning_rate=1e-3, warmup_steps=20, optimizer="muon", muon_learning_rate=0.005,
                      projector_learning_rate=config_dict.placeholder(float))  # the lora stage's; None: learning_rate
  return config
