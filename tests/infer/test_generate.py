import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sizes
from vlmjax.infer import generate as gen
from vlmjax.infer.sampling import SamplingParams, sample
from vlmjax.models import layers
from vlmjax.models.vlm import VLM, VLMConfig

LLAVA = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "clip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=60, vision_feature_layer=-2))
PALIGEMMA = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("gemma-2b", vocab_size=67, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16,
                     mlp_dim=64),
    image_token_id=66, projector="linear", vision_feature_layer=None, vision_feature_select="full", prefix_lm=True))
PAD = 0


@pytest.fixture(scope="module", params=[LLAVA, PALIGEMMA], ids=["llava", "paligemma"])
def model(request):
  config = request.param
  params = nn.meta.unbox(VLM(config).init(jax.random.key(1), **config.example_inputs(1)))["params"]
  # Larger weights make the greedy path less flat, so a wrong cache shows up as different tokens.
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)
  return config, params


def _prompts(config, lengths, seed=0):
  """Right-padded prompts with one image each: [text 1, image..., text...]; returns (ids, mask, pixels)."""
  rng = np.random.default_rng(seed)
  image = config.tokens_per_image
  width = max(lengths)
  ids = np.full((len(lengths), width), PAD, np.int32)
  for row, length in enumerate(lengths):
    ids[row, :length] = rng.integers(1, config.image_token_id, length)
    ids[row, 1:1 + image] = config.image_token_id
  mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
  pixels = rng.standard_normal((len(lengths), 16, 16, 3)).astype(np.float32)
  return ids, mask, pixels


def _greedy_by_full_recomputation(config, params, ids, pixels, steps):
  """The reference: no cache, the whole sequence through the model for every new token. Generated tokens are
  embedded as text even if one equals the image placeholder id (only the prompt's placeholders are images)."""
  model = VLM(config)
  variables = {"params": params}
  image_embeddings = model.apply(variables, jnp.asarray(pixels[None]), method=VLM.encode_images)
  prompt = model.apply(variables, jnp.asarray(ids[None]), image_embeddings, method=VLM.embed)
  forward = jax.jit(lambda embeddings, prefix: model.apply(
      variables, None, jnp.arange(embeddings.shape[1])[None], embeddings=embeddings, prefix_lengths=prefix,
      method=lambda m, *a, **k: m.decoder(*a, **k))[0])
  prefix = jnp.array([len(ids)]) if config.prefix_lm else None
  out = []
  for _ in range(steps):
    generated = model.apply(variables, jnp.asarray([out], jnp.int32).reshape(1, -1),
                            method=lambda m, ids: m.decoder.embed(ids))
    logits = forward(jnp.concatenate([prompt, generated], axis=1), prefix)
    out.append(int(jnp.argmax(logits[0, -1])))
  return out


def test_cached_greedy_decoding_equals_full_recomputation(model):
  config, params = model
  lengths = [12, 7, 10]
  ids, mask, pixels = _prompts(config, lengths)
  tokens = gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=6, eos_ids=(-1,),
                        pad_id=PAD)
  assert tokens.shape == (3, 6)
  for row, length in enumerate(lengths):
    expected = _greedy_by_full_recomputation(config, params, ids[row, :length], pixels[row], 6)
    assert tokens[row].tolist() == expected, f"row {row}"
  assert len({tuple(t) for t in tokens.tolist()}) > 1  # rows really differ


def test_left_padding_gives_the_same_tokens_as_right_padding(model):
  config, params = model
  ids, mask, pixels = _prompts(config, [12, 7])
  left_ids = np.full_like(ids, PAD)
  left_mask = np.zeros_like(mask)
  for row in range(2):
    n = mask[row].sum()
    left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], True
  right = gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=4, eos_ids=(-1,), pad_id=PAD)
  left = gen.generate(params, config, left_ids, left_mask, jnp.asarray(pixels), max_new_tokens=4, eos_ids=(-1,),
                      pad_id=PAD)
  np.testing.assert_array_equal(left, right)


def test_rows_stop_at_their_end_token_and_are_padded(model):
  config, params = model
  ids, mask, pixels = _prompts(config, [12, 9])
  free = gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=6, eos_ids=(-1,), pad_id=PAD)
  eos = int(free[0, 2])  # row 0 produces this token at step 2: make it an end token
  stopped = gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=6, eos_ids=(eos,),
                         pad_id=PAD)
  first_eos = free[0].tolist().index(eos)
  assert stopped[0].tolist() == free[0, :first_eos + 1].tolist() + [PAD] * (5 - first_eos)
  if eos in free[1].tolist():
    cut = free[1].tolist().index(eos)
    assert stopped[1].tolist() == free[1, :cut + 1].tolist() + [PAD] * (5 - cut)
  else:
    assert stopped[1].tolist() == free[1].tolist()


def test_stream_yields_what_generate_returns(model):
  config, params = model
  ids, mask, pixels = _prompts(config, [11, 8], seed=3)
  whole = gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=5, eos_ids=(-1,),
                       pad_id=PAD)
  streamed = np.stack(list(gen.stream(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=5,
                                      eos_ids=(-1,), pad_id=PAD)), axis=1)
  np.testing.assert_array_equal(streamed, whole)


def test_a_prompt_in_a_compiled_bucket_does_not_compile_again(model):
  config, params = model
  ids, mask, pixels = _prompts(config, [10, 9], seed=4)
  gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=3, eos_ids=(-1,), pad_id=PAD)
  compiled = (gen.prefill._cache_size(), gen.decode._cache_size())
  ids, mask, pixels = _prompts(config, [13, 6], seed=5)  # other lengths, other content, the same bucket (16)
  gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=3, eos_ids=(-1,), pad_id=PAD)
  assert (gen.prefill._cache_size(), gen.decode._cache_size()) == compiled
  ids, mask, pixels = _prompts(config, [20, 6], seed=5)  # the next bucket (32) compiles a new prefill
  gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=3, eos_ids=(-1,), pad_id=PAD)
  assert gen.prefill._cache_size() == compiled[0] + 1


def test_unrolled_layers_generate_what_the_scanned_stack_does_and_compile_once_per_bucket(model):
  """What `vlmjax.load` runs: the decoder's layers unstacked, one cache buffer per layer."""
  config, params = model
  unrolled_config = config.replace(decoder=config.decoder.replace(scan_layers=False))
  unrolled_params = {**params, "decoder": layers.unstack_layers(params["decoder"])}
  ids, mask, pixels = _prompts(config, [12, 7, 10], seed=7)
  run = lambda config, params, ids, mask: gen.generate(params, config, ids, mask, jnp.asarray(pixels),
                                                       max_new_tokens=6, eos_ids=(-1,), pad_id=PAD)
  np.testing.assert_array_equal(run(unrolled_config, unrolled_params, ids, mask), run(config, params, ids, mask))
  compiled = (gen.prefill._cache_size(), gen.decode._cache_size())
  other_ids, other_mask, _ = _prompts(config, [14, 9, 6], seed=8)  # the same bucket (16)
  run(unrolled_config, unrolled_params, other_ids, other_mask)
  assert (gen.prefill._cache_size(), gen.decode._cache_size()) == compiled


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy(model):
  config, params = model
  ids, mask, pixels = _prompts(config, [12, 8], seed=6)
  args = (params, config, ids, mask, jnp.asarray(pixels))
  kwargs = dict(max_new_tokens=8, eos_ids=(-1,), pad_id=PAD)
  greedy = gen.generate(*args, **kwargs)
  hot = SamplingParams.fill(2, temperature=5.0)
  a = gen.generate(*args, sampling=hot, seed=1, **kwargs)
  np.testing.assert_array_equal(a, gen.generate(*args, sampling=hot, seed=1, **kwargs))
  assert not np.array_equal(a, gen.generate(*args, sampling=hot, seed=2, **kwargs))
  np.testing.assert_array_equal(gen.generate(*args, sampling=SamplingParams.fill(2, 5.0, top_k=1), seed=3,
                                             **kwargs), greedy)
  np.testing.assert_array_equal(gen.generate(*args, sampling=SamplingParams.fill(2, 5.0, top_p=1e-6), seed=3,
                                             **kwargs), greedy)


def test_one_new_token_is_the_first_of_many(model):
  """max_new_tokens=1 samples from the prefill's logits without a decode step: the same token, greedy and sampled
  with the same seed, as the first of a longer generation."""
  config, params = model
  ids, mask, pixels = _prompts(config, [12, 8], seed=9)
  args = (params, config, ids, mask, jnp.asarray(pixels))
  hot = SamplingParams.fill(2, temperature=5.0)
  for sampling in (None, hot):
    one = gen.generate(*args, max_new_tokens=1, eos_ids=(-1,), pad_id=PAD, sampling=sampling, seed=4)
    many = gen.generate(*args, max_new_tokens=4, eos_ids=(-1,), pad_id=PAD, sampling=sampling, seed=4)
    assert one.shape == (2, 1) and one.dtype == np.int32
    np.testing.assert_array_equal(one[:, 0], many[:, 0])


def test_long_prompts_pad_to_a_sixteenth_of_their_power_of_two(model):
  """A large image's prompt (2135 tokens) is prefilled in 2176 slots, not 2304: `generate` steps by 128 from 2048 to
  4096, where an engine, which compiles every bucket at start-up, keeps the coarser BUCKETS."""
  config, _ = model
  ids = np.ones((2, 2135), np.int32)
  mask = np.arange(2135)[None] < np.array([[2135], [1900]])
  prompts = gen.prepare(config, ids, mask, max_new_tokens=4, pad_id=PAD)
  assert prompts.input_ids.shape == (2, 2176) and prompts.cache.k[0].shape[-1] == 2176
  assert gen.bucket_length(2135) == 2304 and set(gen.BUCKETS) < set(gen.GENERATE_BUCKETS)


def test_prompt_longer_than_the_context_is_an_error(model):
  config, params = model
  ids, mask, pixels = _prompts(config, [12])
  with pytest.raises(ValueError, match=r"a prompt of 12 tokens plus max_new_tokens=10 does not fit the model's "
                     r"context of 16 tokens"):
    gen.generate(params, config, ids, mask, jnp.asarray(pixels), max_new_tokens=10, eos_ids=(1,), pad_id=PAD,
                 max_len=16)


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 2)

  def frequencies(params, key):
    tokens = jax.jit(sample)(logits, params, key)
    return np.bincount(np.asarray(tokens), minlength=4) / len(tokens)

  np.testing.assert_allclose(frequencies(SamplingParams.fill(4000, 1.0), keys[0]), [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)
  top2 = frequencies(SamplingParams.fill(4000, 1.0, top_k=2), keys[1])
  np.testing.assert_allclose(top2, [0.625, 0.375, 0, 0], atol=0.03)
  # top_p=0.7: 0.5 alone is not enough, 0.5+0.3 reaches it; the rest is cut.
  top_p = frequencies(SamplingParams.fill(4000, 1.0, top_p=0.7), keys[1])
  np.testing.assert_allclose(top_p, [0.625, 0.375, 0, 0], atol=0.03)
  greedy = frequencies(SamplingParams.fill(4000, 0.0), keys[0])
  np.testing.assert_array_equal(greedy, [1, 0, 0, 0])
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
    SamplingParams.fill(1, top_p=1.5)
