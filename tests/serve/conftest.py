"""A tiny random-weight VLM with a real tokenizer, chat template and image processor, shared by the serving
tests (one model, so each jitted function compiles once per test session)."""

import json

import flax.linen as nn
import jax
import ml_collections
import pytest

from configs import sizes
from vlmjax.api import VLM
from vlmjax.data import shapes_tokenizer
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.models.vlm import VLM as VLMModel
from vlmjax.models.vlm import VLMConfig

VOCAB = 128
TEXTS = ["USER: ASSISTANT:", "What colour is the circle?", "The red circle is left of the blue square.",
         "How many triangles are there? There are two green triangles.", "Describe the picture in detail."] * 4


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> VLM:
  directory = str(tmp_path_factory.mktemp("tiny_vlm"))
  shapes_tokenizer.train(TEXTS, directory, vocab_size=VOCAB)
  with open(f"{directory}/preprocessor_config.json", "w") as f:
    json.dump(ImageProcessor(size={"height": 16, "width": 16}).to_dict(), f)
  tokenizer = Tokenizer.from_directory(directory)
  assert tokenizer.vocab_size <= VOCAB, tokenizer.vocab_size
  model = {
      "vision": sizes.vit("Ti/16", "clip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
      "decoder": sizes.lm("tiny", vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
      "image_token_id": tokenizer.backend.token_to_id(shapes_tokenizer.IMAGE), "vision_feature_layer": -2}
  config = VLMConfig.from_dict(model)
  params = nn.meta.unbox(VLMModel(config).init(jax.random.key(1), **config.example_inputs(1)))["params"]
  # Larger weights make greedy decoding less flat, so a wrong cache row shows up as different tokens.
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
  return VLM(config=ml_collections.ConfigDict({"model": model}), params=params, tokenizer=tokenizer,
             image_processor=ImageProcessor.from_directory(directory), eos_token_ids=(tokenizer.eos_token_id,),
             pad_token_id=tokenizer.pad_token_id)
