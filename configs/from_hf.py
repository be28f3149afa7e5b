"""Finetune a Hugging Face LLaVA-1.5, PaliGemma, LLaVA-NeXT or Qwen2.5-VL checkpoint: the model, weights, tokenizer,
chat template and image processor all come from its directory (LLaVA-NeXT's and Qwen2.5-VL's images at their own
size: `vlmjax/data/variable_images.py`).

    vlmjax train --config configs/from_hf.py:/models/llava-1.5-7b-hf --workdir /tmp/run \\
        --config.data.sources=llava:/data/llava_v1_5_mix665k.json:/data/images
    # LoRA (QLoRA with --config.lora.quantize=int4), LLaVA's rates:
    ... --config.train.stages=lora --config.optim.learning_rate=2e-4 --config.optim.projector_learning_rate=2e-5

`vlmjax summarize --config configs/from_hf.py:DIR --devices 8` shows whether a run fits before it starts.
"""

from configs import common
from vlmjax.interop import hf


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/from_hf.py needs the checkpoint's directory: --config configs/from_hf.py:DIR")
  config = hf.read_config(arg).config
  config.train.init_from = arg
  # What `vlmjax.load` of the run's workdir stops generation with, as the checkpoint says.
  config.generation = hf.generation_settings(arg)
  # Layers scanned: one compiled layer instead of one per layer (a 7B's 32), and the stack `nn.remat` saves once.
  config.model.scan_layers = True
  return common.finetune_sections(config)
