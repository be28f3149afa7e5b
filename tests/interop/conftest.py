"""Tiny random Hugging Face LLaVA / PaliGemma checkpoints written by transformers itself (no hub downloads).

Every weight of the torch model is perturbed, norms and biases included, so that each one matters for the logits;
the directory also gets a small BPE tokenizer (wrapped and saved by transformers, with a chat template) and the
image processor.
"""

import dataclasses
import os

import pytest
import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = {"llama": ("<pad>", "<s>", "</s>", "<unk>"), "gemma": ("<pad>", "<bos>", "<eos>", "<unk>")}
IMAGE_TOKEN = "<image>"
CORPUS = ["USER: What is in the picture? ASSISTANT: A red circle next to a blue square.",
          "Describe the image in detail, please.", "caption en", "answer en how many shapes are there?",
          "The quick brown fox jumps over the lazy dog. Ünïcödé — naïve café!", "detect circle ; square"] * 4
# The LLaVA-1.5 processor's template (content parts; images first), with a BOS and a role check added.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class Case:
  """One tiny checkpoint: its architecture and the shapes that vary between cases."""

  name: str
  kind: str  # "llava" or "paligemma"
  vocab_size: int
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  image_size: int = 24
  patch_size: int = 6
  vision_feature_layer: int = -2
  select: str = "default"
  tie: bool = False
  layout: str = "saved"  # "saved": what save_pretrained writes; "module": state_dict names (model.*, lm_head)
  shard: bool = False  # save_pretrained in several files with an index (saved layout)


CASES = {case.name: case for case in [
    Case("llava_gqa", "llava", vocab_size=131),
    Case("llava_mqa_full_tied", "llava", vocab_size=97, num_kv_heads=1, vision_feature_layer=-1, select="full",
         image_size=30, tie=True, layout="module"),
    Case("paligemma_mqa", "paligemma", vocab_size=113, num_kv_heads=1, head_dim=12),
    Case("paligemma_gqa_sharded", "paligemma", vocab_size=130, head_dim=8, patch_size=8, shard=True),
]}


def _text_family(case: Case) -> str:
  return "llama" if case.kind == "llava" else "gemma"


def train_tokenizer(case: Case, directory: str) -> transformers.PreTrainedTokenizerFast:
  """A BPE tokenizer (at most the model's vocabulary, the image token last), saved by transformers with the chat
  template."""
  pad, bos, eos, unk = SPECIALS[_text_family(case)]
  backend = tokenizers.Tokenizer(models.BPE(unk_token=unk))
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  trainer = trainers.BpeTrainer(vocab_size=case.vocab_size - 1, special_tokens=[pad, bos, eos, unk],
                                show_progress=False)
  backend.train_from_iterator(CORPUS, trainer)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
      extra_special_tokens=[IMAGE_TOKEN], add_bos_token=True, add_eos_token=False, chat_template=CHAT_TEMPLATE)
  tokenizer.save_pretrained(directory)
  return tokenizer


def image_processor(case: Case):
  """CLIP's processor (shortest edge, then a center crop) for LLaVA, SigLIP's (fixed size) for PaliGemma."""
  size = case.image_size
  if case.kind == "llava":
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                              crop_size={"height": size, "width": size})
  return transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=2,
                                               image_mean=[0.4, 0.5, 0.6], image_std=[0.3, 0.2, 0.25])


def hf_config(case: Case, image_token_id: int):
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                image_size=case.image_size, patch_size=case.patch_size, initializer_range=0.1)
  text = dict(vocab_size=case.vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=case.num_heads, num_key_value_heads=case.num_kv_heads, head_dim=case.head_dim,
              initializer_range=0.1, rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=500.0),
              tie_word_embeddings=case.tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  if case.kind == "llava":
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision), text_config=transformers.LlamaConfig(**text),
        image_token_index=image_token_id, vision_feature_layer=case.vision_feature_layer,
        vision_feature_select_strategy=case.select, tie_word_embeddings=case.tie)
  return transformers.PaliGemmaConfig(
      vision_config=transformers.SiglipVisionConfig(**vision, vision_use_head=False),
      text_config=transformers.GemmaConfig(**text), image_token_index=image_token_id, projection_dim=48)


def build_model(case: Case, image_token_id: int):
  """The transformers model with seed 0 and every parameter perturbed, in float32 eval mode."""
  torch.manual_seed(0)
  config = hf_config(case, image_token_id)
  model_class = (transformers.LlavaForConditionalGeneration if case.kind == "llava"
                 else transformers.PaliGemmaForConditionalGeneration)
  model = model_class(config).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  return model


def write_checkpoint(case: Case, directory: str):
  """Writes the tokenizer, image processor, model and generation config; returns the torch model."""
  tokenizer = train_tokenizer(case, directory)
  image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
  processor = image_processor(case)
  processor.save_pretrained(directory)
  model = build_model(case, image_token_id)
  model.generation_config.eos_token_id = [tokenizer.eos_token_id, image_token_id - 1]
  if case.layout == "saved":
    model.save_pretrained(directory, **({"max_shard_size": "40KB"} if case.shard else {}))
  else:  # the module's own names (model.vision_tower.*, model.language_model.*, lm_head.*), tied copies kept
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  return model


def pytest_generate_tests(metafunc):
  """A test that takes `case_name` runs for every case."""
  if "case_name" in metafunc.fixturenames:
    metafunc.parametrize("case_name", list(CASES))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """checkpoint(name) -> (case, directory, torch model); each case is written once per session."""
  written = {}

  def get(name: str):
    if name not in written:
      directory = str(tmp_path_factory.mktemp(name))
      written[name] = (CASES[name], directory, write_checkpoint(CASES[name], directory))
    return written[name]

  return get
