import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import sizes
from vlmjax.data import pipeline, shapes, shapes_tasks
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.models.vlm import VLM, VLMConfig
from vlmjax.train import state as state_lib

LENGTH = 240  # two or three conversations of 70-105 tokens (16 image tokens each) per row
IMAGES_PER_ROW = 3
# 16 tokens per 64 x 64 image (patches of 16), the shapes tokenizer's vocabulary and <image> id.
CONFIG = VLMConfig.from_dict(dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=64, patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=512, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
    image_token_id=3, vision_feature_layer=None, vision_feature_select="full"))


@pytest.fixture(scope="module")
def to_example(tiny_shapes_dir):
  model_dir = shapes.tokenizer_dir(tiny_shapes_dir)
  encoder = pipeline.ConversationEncoder(Tokenizer.from_directory(model_dir), CONFIG.image_token_id,
                                         CONFIG.tokens_per_image, LENGTH)
  processor = ImageProcessor.from_directory(model_dir)

  def to_example(record, rng):
    ids, assistant = encoder(shapes_tasks.training_messages(record, rng))
    return pipeline.example_arrays(ids, assistant, processor([record["image"]])[0])
  return to_example


def _dataset(tiny_shapes_dir, to_example, **options):
  options = dict(dict(seed=0, batch_size=2, length=LENGTH, packing=True, images_per_row=IMAGES_PER_ROW), **options)
  return pipeline.train_dataset(shapes.load(tiny_shapes_dir, "train"), to_example, **options)


def _segments(row):
  """The examples of a packed row: [(ids, targets, loss_mask, pixels)], in order."""
  segments = []
  for segment in range(1, int(row["segment_ids"].max()) + 1):
    where = row["segment_ids"] == segment
    np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
    segments.append((row["input_ids"][where], row["targets"][where], row["loss_mask"][where],
                     row["pixel_values"][segment - 1]))
  return segments


def test_a_packed_batch_has_the_examples_of_the_unpacked_stream_with_the_same_loss_and_logits(tiny_shapes_dir,
                                                                                              to_example):
  packed = next(iter(_dataset(tiny_shapes_dir, to_example, num_epochs=1)))
  assert packed["input_ids"].shape == (2, LENGTH) and packed["pixel_values"].shape == (2, IMAGES_PER_ROW, 64, 64, 3)
  rows = [_segments(jax.tree.map(lambda x, b=b: x[b], packed)) for b in range(2)]
  placed = [(b, segment) for b, segments in enumerate(rows) for segment in range(1, len(segments) + 1)]
  count = len(placed)
  assert count >= 4, f"the test wants several examples per row, got {count} in 2 rows"
  # First-fit packs the stream's first `count` examples, nothing else.
  unpacked = next(iter(_dataset(tiny_shapes_dir, to_example, batch_size=count, packing=False, num_epochs=1)))
  by_ids = {unpacked["input_ids"][i][unpacked["input_mask"][i]].tobytes(): i for i in range(count)}
  order = [by_ids[ids.tobytes()] for segments in rows for ids, _, _, _ in segments]
  assert sorted(order) == list(range(count))
  for (ids, targets, loss_mask, pixels), i in zip([s for segments in rows for s in segments], order):
    np.testing.assert_array_equal(targets, unpacked["targets"][i][:len(ids)])
    np.testing.assert_array_equal(loss_mask, unpacked["loss_mask"][i][:len(ids)])
    np.testing.assert_array_equal(pixels, unpacked["pixel_values"][i])
  # Padding is outside the loss and its image slots are empty.
  assert not packed["loss_mask"][packed["segment_ids"] == 0].any()
  assert not packed["input_mask"][packed["segment_ids"] == 0].any()
  for b, segments in enumerate(rows):
    assert not packed["pixel_values"][b, len(segments):].any()

  params = jax.jit(lambda: nn.meta.unbox(VLM(CONFIG).init(jax.random.key(0), **CONFIG.example_inputs(1))))()
  loss_fn = jax.jit(state_lib.vlm_loss, static_argnames=("config",))
  packed_loss, packed_tokens = loss_fn(params["params"], config=CONFIG, batch=packed)
  loss, tokens = loss_fn(params["params"], config=CONFIG, batch=unpacked)
  assert float(packed_tokens) == float(tokens) > 0
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
  apply = jax.jit(lambda batch: VLM(CONFIG).apply(params, batch["input_ids"], batch["pixel_values"],
                                                  batch.get("positions"), input_mask=batch["input_mask"],
                                                  segment_ids=batch.get("segment_ids"))[0])
  packed_logits, logits = apply(packed), apply(unpacked)
  for (b, segment), i in zip(placed, order):
    where = packed["segment_ids"][b] == segment
    np.testing.assert_allclose(packed_logits[b][where], logits[i][:where.sum()], atol=1e-5)


def test_restoring_the_iterator_state_continues_exactly_with_packing(tiny_shapes_dir, to_example):
  iterator = iter(_dataset(tiny_shapes_dir, to_example, seed=3))
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it
  expected = [next(iterator) for _ in range(12)]  # crosses an epoch boundary (64 examples, ~5 per batch)
  resumed = iter(_dataset(tiny_shapes_dir, to_example, seed=3))
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(12)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_packing_names_what_it_needs(tiny_shapes_dir, to_example):
  with pytest.raises(ValueError, match="packing needs images_per_row"):
    _dataset(tiny_shapes_dir, to_example, images_per_row=None)
  with_id = lambda record, rng: dict(to_example(record, rng), image_id=np.int32(record["image_id"]))
  with pytest.raises(ValueError, match=r"packing carries .* the examples have the keys .*image_id"):
    next(iter(_dataset(tiny_shapes_dir, with_id, prefetch=0)))
