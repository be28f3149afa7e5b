"""Size registries: the published shapes of the vision encoders and language models the configs build on.

    config.model.vision = sizes.vit("L/14", variant="clip", image_size=336)
    config.model.decoder = sizes.lm("llama2-7b", vocab_size=32064)
"""

import ml_collections

# Transformer shapes of the vision encoders (ViT paper names; So400m is SigLIP's shape-optimized 400M).
VIT_SIZES = {
    "Ti/16": dict(width=192, depth=12, num_heads=3, mlp_dim=768, patch_size=16),
    "S/16": dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16),
    "B/16": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
    "L/14": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14),
    "So400m/14": dict(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14),
}

# How CLIP and SigLIP differ besides their size.
VIT_VARIANTS = {
    "clip": dict(activation="quick_gelu", norm_eps=1e-5, cls_token=True, pre_norm=True, post_norm=True,
                 patch_bias=False),
    "siglip": dict(activation="gelu_tanh", norm_eps=1e-6, cls_token=False, pre_norm=False, post_norm=True,
                   patch_bias=True),
}

# Language-model families: how Llama and Gemma differ besides their size.
LM_FAMILIES = {
    "llama": dict(activation="silu", norm_unit_offset=False, scale_embeddings=False, tie_embeddings=False),
    "gemma": dict(activation="gelu_tanh", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True),
}

LM_SIZES = {
    "tiny": dict(family="llama", vocab_size=1024, width=256, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=768,
                 rope_theta=10000.0, norm_eps=1e-6),
    # TinyLlama-1.1B's shape: Llama-2 architecture, 22 layers, grouped-query attention.
    "1b": dict(family="llama", vocab_size=32000, width=2048, depth=22, num_heads=32, num_kv_heads=4, mlp_dim=5632,
               rope_theta=10000.0, norm_eps=1e-5),
    "llama2-7b": dict(family="llama", vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=32,
                      mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5),
    "gemma-2b": dict(family="gemma", vocab_size=256000, width=2048, depth=18, num_heads=8, num_kv_heads=1,
                     head_dim=256, mlp_dim=16384, rope_theta=10000.0, norm_eps=1e-6),
}


def vit(size: str, variant: str, image_size: int, **overrides) -> ml_collections.ConfigDict:
  """The `model.vision` section for a registered size and variant ('clip' or 'siglip')."""
  if size not in VIT_SIZES:
    raise ValueError(f"unknown ViT size {size!r}; registered sizes: {list(VIT_SIZES)}")
  if variant not in VIT_VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; choose one of {list(VIT_VARIANTS)}")
  return ml_collections.ConfigDict({**VIT_SIZES[size], **VIT_VARIANTS[variant], "image_size": image_size,
                                    "stem": "patch", **overrides})


def lm(size: str, **overrides) -> ml_collections.ConfigDict:
  """The `model.decoder` section for a registered language-model size."""
  if size not in LM_SIZES:
    raise ValueError(f"unknown language-model size {size!r}; registered sizes: {list(LM_SIZES)}")
  shape = dict(LM_SIZES[size])
  family = shape.pop("family")
  return ml_collections.ConfigDict({**LM_FAMILIES[family], **shape, **overrides})
