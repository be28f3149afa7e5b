"""Do a trained shapes VLM's image tokens say where they are? A linear probe of position at every stage.

    python experiments/shapes_tiny/probe_positions.py --workdir /tmp/shapes --data_dir /tmp/shapes/data

For each ViT hidden state (1..depth, then the final output) and for the projector's output (the language
model's image tokens), a ridge regression from a token's features to its row and column in its grid is fit on
half the validation images' tokens and scored (R², 1 = fully linearly readable) on the other half: over all
tokens, and over the tokens whose centre lies on an object (there, position can only come from the position
embedding, since the content is a shape seen anywhere). Relation questions need the second.
"""

import numpy as np
from absl import app, flags

import vlmjax
from vlmjax.data import shapes, shapes_tasks
from vlmjax.models.vit import ViT
from vlmjax.models.vlm import VLM

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained shapes VLM's workdir.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "A built shapes data set.", required=True)
_IMAGES = flags.DEFINE_integer("images", 400, "Validation images probed.")


def ridge_r2(features: np.ndarray, target: np.ndarray, l2: float = 1e-2) -> float:
  """R² on the second half of a ridge regression fit on the first half. features float[M, D], target float[M]."""
  x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  half = len(x) // 2
  weights = np.linalg.solve(x[:half].T @ x[:half] + l2 * np.eye(x.shape[1]), x[:half].T @ target[:half])
  residual = x[half:] @ weights - target[half:]
  return float(1 - (residual**2).mean() / target[half:].var())


def report(name: str, tokens: np.ndarray, records: list[dict]) -> None:
  """tokens float[N, grid*grid, D] of the N records' images: prints the probe's R² for row and column, all
  tokens and object tokens."""
  grid = int(round(tokens.shape[1] ** 0.5))
  features = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
  rows, columns = (np.tile(axis.reshape(-1), len(records)).astype(np.float64)
                   for axis in np.divmod(np.arange(grid * grid), grid))
  # A token is on an object when its centre lies in one's box: the patch label's class 0 means none.
  objects = np.concatenate([shapes_tasks.patch_labels(record, grid)[:, 0] > 0 for record in records])
  scores = [ridge_r2(features[keep], target[keep]) for keep in (slice(None), objects) for target in (columns, rows)]
  print(f"{name:<22} {grid:>2}x{grid:<2} " + " ".join(f"{s:>8.3f}" for s in scores))


def main(argv):
  del argv
  vlm = vlmjax.load(_WORKDIR.value)
  config = vlm.model_config
  source = shapes.load(_DATA_DIR.value, "validation")
  records = [source[i] for i in range(min(_IMAGES.value, len(source)))]
  pixels = vlm.image_processor([r["image"] for r in records])
  print(f"{'features':<22} {'grid':<5} {'col':>8} {'row':>8} {'obj col':>8} {'obj row':>8}")
  for layer in [*range(1, config.vision.depth), None]:
    tokens = np.asarray(ViT(config.vision).apply({"params": vlm.params["vision"]}, pixels, feature_layer=layer))
    tokens = tokens[:, int(config.vision.cls_token):]
    report(f"vit layer {layer}" if layer else "vit output", tokens, records)
  report("projector (LM input)", np.asarray(VLM(config).apply({"params": vlm.params}, pixels,
                                                                method=VLM.encode_images)), records)


if __name__ == "__main__":
  app.run(main)
