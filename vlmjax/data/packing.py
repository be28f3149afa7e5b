"""Packing: several examples side by side in one row of `length` tokens, told apart by segment ids.

An example's tokens go to the first row of the current pack with room for them (grain's first-fit packing over
`rows` rows at a time); its image(s) go to the same row's next image slots, so the k-th run of image
placeholders in a row meets the row's k-th image, as `VLM.embed` splices them. A packed row is

    input_ids, targets, loss_mask: [T]       the examples one after the other, zeros after the last
    segment_ids int32[T]                     1, 2, ... per example, 0 on padding
    positions int32[T]                       0, 1, ... restarting at each example (RoPE)
    input_mask bool[T]                       segment_ids > 0
    pixel_values float32[N, H, W, 3]         the examples' images in order, zeros after the last

with T = length and N = images_per_row. Attention stays within a segment (the model's mask builder takes the
segment ids), and each example's last target is already outside the loss, so a packed row's logits and loss
are those of its examples run one by one.
"""

import grain
import numpy as np

PACKED_KEYS = ("input_ids", "targets", "loss_mask", "pixel_values")


def _with_image_axis(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pixel_values float[H, W, 3] -> float[1, H, W, 3]; float[I, H, W, 3] stays (I images, in order)."""
  if set(example) != set(PACKED_KEYS):
    raise ValueError(f"packing carries {', '.join(PACKED_KEYS)} into its rows, but the examples have the keys "
                     f"{sorted(example)}: make to_example return just those, or train without packing")
  pixels = example["pixel_values"]
  return dict(example, pixel_values=pixels[None] if pixels.ndim == 3 else pixels)


def _model_inputs(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed row (segment ids and positions for every packed key) -> the row the model takes."""
  segment_ids = row["input_ids_segment_ids"]
  return {**{key: row[key] for key in PACKED_KEYS}, "segment_ids": segment_ids,
          "positions": row["input_ids_positions"], "input_mask": segment_ids > 0}


def pack(dataset: grain.IterDataset, *, length: int, images_per_row: int, rows: int) -> grain.IterDataset:
  """Packed rows (see the module docstring) of the examples of `dataset`, `rows` at a time and in order.

  Args:
    dataset: examples {input_ids, targets, loss_mask: [t] with t <= length, pixel_values: [H, W, 3] or
      [I, H, W, 3]}.
    length: tokens per row.
    images_per_row: image slots per row; it also caps the examples per row. `length // tokens_per_image`
      never turns away an example that has an image; fewer slots spare the vision tower padding images.
    rows: rows packed together (the batch size): each pack is emitted whole, so batches of `rows` rows are
      packs, and a saved iterator state lands between two packs.
  """
  if images_per_row < 1:
    raise ValueError(f"images_per_row must be positive, got {images_per_row}")
  lengths = {"input_ids": length, "targets": length, "loss_mask": length, "pixel_values": images_per_row}
  packed = grain.experimental.FirstFitPackIterDataset(
      dataset.map(_with_image_axis), length_struct=lengths, num_packing_bins=rows, shuffle_bins=False,
      max_sequences_per_bin=images_per_row)
  return packed.map(_model_inputs)
