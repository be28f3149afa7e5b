"""Can a trained shapes VLM say where an object is? Its answers to questions of position, by object count.

    python experiments/shapes_tiny/probe_where.py --workdir /tmp/shapes --data_dir /tmp/shapes/data

On the first validation images it asks two questions per image of where an object lies against the image's
centre (`shapes_scene.position_questions`, "Is the red circle to the left or to the right of the centre?", or with
--centre_first "Is the centre to the left or to the right of the red circle?") and
the image's own relation questions, and prints the exact-match accuracy of each kind for 1, 2, 3 and 4 objects
in the image. With one object the model only has to read a position; with more it must first find the object
named. It also prints how much of the language model's image-token variance is position: the variance over the
grid of the projector's position table (if it has one), against the variance of the rest of its output.
"""

import collections

import numpy as np
from absl import app, flags

import vlmjax
from vlmjax.data import shapes, shapes_scene, shapes_tasks
from vlmjax.models.vlm import VLM

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained shapes VLM's workdir.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "A built shapes data set.", required=True)
_IMAGES = flags.DEFINE_integer("images", 200, "Validation images asked about.")
_CENTRE_FIRST = flags.DEFINE_bool("centre_first", False, "Name the centre first ('Is the centre to the left or to "
                                  "the right of the red circle?'), as data.position_centre_first trains.")


def main(argv):
  del argv
  vlm = vlmjax.load(_WORKDIR.value)
  source = shapes.load(_DATA_DIR.value, "validation")
  records = [source[i] for i in range(min(_IMAGES.value, len(source)))]
  rng = np.random.default_rng(0)
  asked = []  # (record, question)
  for record in records:
    objects = shapes_tasks.scene_objects(record)
    asked += [(record, q) for q in shapes_scene.position_questions(objects, record["image"].shape[0], rng, 2,
                                                                         _CENTRE_FIRST.value)]
    asked += [(record, q) for q in record["vqa"] if q["type"] == "relation"]
  right, total = collections.Counter(), collections.Counter()
  for start in range(0, len(asked), 64):
    batch = asked[start:start + 64]
    answers = vlm.generate([r["image"] for r, _ in batch], [q["question"] for _, q in batch], max_new_tokens=3)
    for (record, question), answer in zip(batch, answers):
      for key in (question["type"], (question["type"], len(record["scene"]))):
        total[key] += 1
        right[key] += answer.strip() == question["answer"]
  print(f"{'questions':<12}{'all':>8}" + "".join(f"{f'{n} obj.':>9}" for n in range(1, 5)))
  for kind in ("position", "relation"):
    cells = [total[kind]] + [total[kind, n] for n in range(1, 5)]
    scores = [right[kind] / total[kind]] + [right[kind, n] / max(total[kind, n], 1) for n in range(1, 5)]
    print(f"{kind:<12}" + "".join(f"{s:>9.3f}" if c else f"{'-':>9}" for s, c in zip(scores, cells)))

  table = vlm.params["projector"].get("position_embedding")
  if table is not None:
    pixels = vlm.image_processor([r["image"] for r in records])
    tokens = np.asarray(VLM(vlm.model_config).apply({"params": vlm.params}, pixels, method=VLM.encode_images),
                        np.float64)
    table = np.asarray(table, np.float64)
    rest = (tokens - table[None]).reshape(-1, tokens.shape[-1])
    print(f"variance per dimension: position table over the grid {table.var(0).mean():.3f}, "
          f"the rest of the image tokens {rest.var(0).mean():.3f}")


if __name__ == "__main__":
  app.run(main)
