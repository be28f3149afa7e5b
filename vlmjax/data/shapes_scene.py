"""Scenes of coloured shapes: sampling, rendering, and every annotation derived from a scene.

A scene is a tuple of `SceneObject`s (shape, colour, size, pixel box) drawn on a black, optionally noisy,
background. Object pixels carry their palette colour exactly and background noise stays below every palette
colour's brightest channel, so an object's pixels can be found by exact colour match. All text is built from
a small regular vocabulary (the words in SHAPES, COLOURS, SIZES, digits, yes/no, left/right/above/below) so a
tiny model can learn it. `annotate` is the only entry point for the language side.
"""

import dataclasses
import math

import numpy as np

# Object distribution is skewed on purpose: POPE's "popular" negatives are the most frequent objects.
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SHAPE_WEIGHTS = (0.30, 0.25, 0.20, 0.15, 0.10)
COLOURS = {
  "red": (230, 40, 40),
  "orange": (255, 150, 30),
  "yellow": (250, 230, 50),
  "green": (50, 190, 70),
  "blue": (50, 100, 240),
  "purple": (150, 70, 210),
  "pink": (255, 130, 200),
  "white": (245, 245, 245),
}
COLOUR_WEIGHTS = (0.20, 0.16, 0.14, 0.12, 0.11, 0.10, 0.09, 0.08)
SIZES = {"small": 7 / 32, "large": 5 / 16}  # side of the square an object is drawn in, over the image side
NOISE_MAX = 40  # background noise is uniform in [0, NOISE_MAX], below every colour's brightest channel
GAP = 2  # pixels kept free between the squares objects are drawn in
IMAGE_TOKEN = "<image>"  # starts the first user turn of a conversation (LLaVA convention)


def _star(inner: float = 0.4) -> tuple[tuple[tuple[float, float], ...], ...]:
  """A five-pointed star as convex pieces: the inner pentagon and one triangle per point."""
  angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
  ring = [((1.0, inner)[i % 2] * math.cos(a), (1.0, inner)[i % 2] * math.sin(a)) for i, a in enumerate(angles)]
  return (tuple(ring[1::2]),) + tuple((ring[i - 1], ring[i], ring[i + 1]) for i in range(0, 10, 2))


# Shapes as unions of convex polygons, in coordinates where the drawing square is [-1, 1]^2 and y points
# down; the circle is exact. A pixel belongs to a shape when its centre is inside or on the outline.
_PIECES = {
  "square": (((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),),
  "triangle": (((0.0, -0.95), (0.95, 0.85), (-0.95, 0.85)),),
  "diamond": (((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),),
  "star": _star(),
}
_ON_OUTLINE = 1e-9  # tolerance that keeps pixel centres lying exactly on an outline, on every side alike


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One drawn object. `box` = (x0, y0, x1, y1): the tight box of its pixels, ends exclusive, so
  `image[y0:y1, x0:x1]` crops it exactly."""

  shape: str
  colour: str
  size: str
  box: tuple[int, int, int, int]

  @property
  def center(self) -> tuple[float, float]:
    return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

  def to_json(self) -> dict:
    return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box)}


def shape_mask(shape: str, cell: tuple[int, int, int], image_size: int) -> np.ndarray:
  """bool[S, S]: pixels whose centres fall inside `shape` drawn in the square cell (x0, y0, side)."""
  x0, y0, side = cell
  half = side / 2
  coords = (np.arange(image_size) + 0.5 - half) / half
  u = (coords - x0 / half)[None, :]  # [1, S], -1..1 across the cell
  v = (coords - y0 / half)[:, None]  # [S, 1]
  if shape == "circle":
    return u * u + v * v <= 1.0 + _ON_OUTLINE
  inside = np.zeros((image_size, image_size), bool)
  for piece in _PIECES[shape]:
    edges = zip(piece, piece[1:] + piece[:1])
    # cross product of every edge with the point: a single sign for all edges inside a convex polygon
    crosses = np.stack([(xb - xa) * (v - ya) - (yb - ya) * (u - xa) for (xa, ya), (xb, yb) in edges])
    inside |= (crosses >= -_ON_OUTLINE).all(axis=0) | (crosses <= _ON_OUTLINE).all(axis=0)
  return inside


def _free_corners(cells: list[tuple[int, int, int]], side: int, image_size: int) -> np.ndarray:
  """bool[n, n], n = image_size - side + 1: top-left corners (y, x) where a square of `side` keeps GAP
  pixels away from every square in `cells` (x0, y0, side)."""
  corners = np.arange(image_size - side + 1)
  free = np.ones((corners.size, corners.size), bool)
  for x0, y0, other in cells:
    apart_x = (corners >= x0 + other + GAP) | (corners + side + GAP <= x0)
    apart_y = (corners >= y0 + other + GAP) | (corners + side + GAP <= y0)
    free &= apart_y[:, None] | apart_x[None, :]
  return free


def sample_scene(
  rng: np.random.Generator, image_size: int, max_objects: int, noise: bool
) -> tuple[tuple[SceneObject, ...], np.ndarray]:
  """Draws 1..max_objects non-overlapping objects. Returns (objects sorted left to right, uint8[S, S, 3])."""
  image = np.zeros((image_size, image_size, 3), np.uint8)
  if noise:
    image[:] = rng.integers(0, NOISE_MAX + 1, image.shape, dtype=np.uint8)
  cells, objects = [], []
  for _ in range(int(rng.integers(1, max_objects + 1))):
    shape = SHAPES[rng.choice(len(SHAPES), p=SHAPE_WEIGHTS)]
    colour = list(COLOURS)[rng.choice(len(COLOURS), p=COLOUR_WEIGHTS)]
    size = list(SIZES)[rng.integers(len(SIZES))]
    side = round(SIZES[size] * image_size)
    free = _free_corners(cells, side, image_size)  # bool[S - side + 1, S - side + 1], indexed [y, x]
    if not free.any():  # no room left: the scene keeps fewer objects
      continue
    y0, x0 = (int(c) for c in np.argwhere(free)[rng.integers(free.sum())])
    cells.append((x0, y0, side))
    mask = shape_mask(shape, (x0, y0, side), image_size)
    image[mask] = COLOURS[colour]
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    objects.append(SceneObject(shape, colour, size, box))
  return tuple(sorted(objects, key=lambda o: (o.center, o.box))), image


# ---------------------------------------------------------------------------------------------- language
# A description is a tuple of attribute names, always in the order size, colour, shape:
# ("colour", "shape") reads "red circle"; without "shape" the noun is "object" ("large red object").
ANY_FORMS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour"),
       ("size", "colour", "shape"))
COLOUR_QUESTION_FORMS = (("shape",), ("size",), ("size", "shape"))
SHAPE_QUESTION_FORMS = (("colour",), ("size",), ("size", "colour"))
SIZE_QUESTION_FORMS = (("shape",), ("colour",), ("colour", "shape"))
FULL = ("size", "colour", "shape")
RELATION_MARGIN = 2  # boxes must be this many pixels apart on an axis to ask about it
POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_PROBES = 2  # positives (and as many negatives) per image and setting, fewer when fewer objects exist
LETTERS = "ABCD"


def phrase(values: dict[str, str]) -> str:
  """{"size": "large", "colour": "red"} -> "large red object"; {"shape": "star"} -> "star"."""
  words = [values[a] for a in FULL if a in values]
  return " ".join(words if "shape" in values else words + ["object"])


def article(words: str) -> str:
  return ("an " if words[0] in "aeiou" else "a ") + words


def plural(words: str) -> str:
  return words + "s"


def _values(obj: SceneObject, form: tuple[str, ...]) -> dict[str, str]:
  return {a: getattr(obj, a) for a in form}


def _matches(obj: SceneObject, values: dict[str, str]) -> bool:
  return all(getattr(obj, a) == v for a, v in values.items())


def _unique_form(obj: SceneObject, objects, forms) -> tuple[str, ...] | None:
  """The first form in `forms` that picks out `obj` alone among `objects`, or None."""
  for form in forms:
    if sum(_matches(o, _values(obj, form)) for o in objects) == 1:
      return form
  return None


def _join(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pick(rng: np.random.Generator, items: list, k: int) -> list:
  """Up to k items, chosen without replacement, kept in their original order."""
  return [items[i] for i in sorted(rng.choice(len(items), min(k, len(items)), replace=False))]


def captions(objects: tuple[SceneObject, ...]) -> list[str]:
  """Four phrasings of the same left-to-right listing; the first is the canonical caption."""
  names = [article(phrase(_values(o, FULL))) for o in objects]
  n = len(objects)
  listing = _join(names)
  return [
    listing[0].upper() + listing[1:] + ".",
    f"There {'is' if n == 1 else 'are'} {n} {'shape' if n == 1 else 'shapes'}: {listing}.",
    "From left to right: " + ", ".join(names) + ".",
    f"An image of {listing}.",
  ]


def _vqa(type_: str, question: str, answer: str) -> dict:
  return {"type": type_, "question": question, "answer": answer, "answers": [answer] * 10}


def _attribute_questions(objects, asked, forms) -> list[dict]:
  """"What <asked> is the <description>?" for every object the first of `forms` that picks it out alone
  describes; `asked` (colour, shape or size) is also the question's type."""
  questions = []
  for obj in objects:
    form = _unique_form(obj, objects, forms)
    if form is not None:
      questions.append(_vqa(asked, f"What {asked} is the {phrase(_values(obj, form))}?", getattr(obj, asked)))
  return questions


def _count_question(objects, rng) -> dict:
  kind = ("objects", "shape", "colour", "colour shape")[rng.integers(4)]
  present = objects[rng.integers(len(objects))]
  values = {}
  if kind in ("colour", "colour shape"):
    values["colour"] = present.colour if rng.random() < 0.8 else list(COLOURS)[rng.integers(len(COLOURS))]
  if kind in ("shape", "colour shape"):
    values["shape"] = present.shape if rng.random() < 0.8 else SHAPES[rng.integers(len(SHAPES))]
  count = sum(_matches(o, values) for o in objects)
  return _vqa("count", f"How many {plural(phrase(values))} are there?", str(count))


def _absent_descriptions(objects, form) -> list[dict[str, str]]:
  choices = {"size": list(SIZES), "colour": list(COLOURS), "shape": list(SHAPES)}
  combos = [{}]
  for attribute in form:
    combos = [{**c, attribute: value} for c in combos for value in choices[attribute]]
  return [c for c in combos if not any(_matches(o, c) for o in objects)]


def _existence_question(objects, rng) -> dict:
  form = (("shape",), ("colour",), ("colour", "shape"))[rng.integers(3)]
  if rng.random() < 0.5:
    values, answer = _values(objects[rng.integers(len(objects))], form), "yes"
  else:
    absent = _absent_descriptions(objects, form)
    values, answer = absent[rng.integers(len(absent))], "no"
  return _vqa("existence", f"Is there {article(phrase(values))}?", answer)


def _named(objects) -> list[tuple[SceneObject, str]]:
  """(object, description) for every object some description picks out alone."""
  return [(o, phrase(_values(o, f))) for o in objects if (f := _unique_form(o, objects, ANY_FORMS))]


def _relation_questions(objects) -> list[dict]:
  named = _named(objects)
  questions = []
  for a, a_name in named:
    for b, b_name in named:
      if a is b:
        continue
      if a.box[2] + RELATION_MARGIN <= b.box[0] or b.box[2] + RELATION_MARGIN <= a.box[0]:
        answer = "left" if a.box[2] <= b.box[0] else "right"
        question = f"Is the {a_name} to the left or to the right of the {b_name}?"
        questions.append(_vqa("relation", question, answer))
      if a.box[3] + RELATION_MARGIN <= b.box[1] or b.box[3] + RELATION_MARGIN <= a.box[1]:
        answer = "above" if a.box[3] <= b.box[1] else "below"
        questions.append(_vqa("relation", f"Is the {a_name} above or below the {b_name}?", answer))
  return questions


def position_questions(objects, image_size: int, rng: np.random.Generator, count: int,
                       centre_first: bool = False) -> list[dict]:
  """Up to `count` relation questions about one object and the image's centre ("Is the red circle to the left
  or to the right of the centre?"), drawn from those of every object some description picks out alone, on each
  axis where its box centre lies at least RELATION_MARGIN / 2 pixels off the image's centre line. One object to
  find, not two: 95% of relation questions are answered right by the first object's side of the centre alone,
  and as often by the second's, the other way round. `centre_first` names the centre first ("Is the centre to
  the left or to the right of the red circle?"), so the object is named last, where every other question names
  the object it asks about."""
  centre = image_size / 2
  sides = (("left", "right", "to the left or to the right of"), ("above", "below", "above or below"))
  questions = []
  for obj, name in _named(objects):
    for (before, after, words), offset in zip(sides, (c - centre for c in obj.center)):
      if abs(offset) < RELATION_MARGIN / 2:
        continue
      if centre_first:
        question, answer = f"Is the centre {words} the {name}?", before if offset > 0 else after
      else:
        question, answer = f"Is the {name} {words} the centre?", before if offset < 0 else after
      questions.append(_vqa("position", question, answer))
  return _pick(rng, questions, count)


def size_questions(objects, rng: np.random.Generator | None = None, count: int = 0) -> list[dict]:
  """Questions of an object's size, "What size is the red circle?" -> "small" or "large", with the object described
  by its shape, colour or both (never its size) where that picks it out alone: a question type the main job never
  trains (`data.size_questions`), for adapting a trained model to a new skill (tools/lora_demo.py). Every such
  question, objects left to right, when rng is None; else up to `count` of them, drawn by rng."""
  questions = _attribute_questions(objects, "size", SIZE_QUESTION_FORMS)
  return questions if rng is None else _pick(rng, questions, count)


def vqa_questions(objects, rng, per_type: int) -> list[dict]:
  """Up to `per_type` questions of each type: colour, shape, count, existence, relation."""
  return (_pick(rng, _attribute_questions(objects, "colour", COLOUR_QUESTION_FORMS), per_type)
      + _pick(rng, _attribute_questions(objects, "shape", SHAPE_QUESTION_FORMS), per_type)
      + [_count_question(objects, rng) for _ in range(per_type)]
      + [_existence_question(objects, rng) for _ in range(per_type)]
      + _pick(rng, _relation_questions(objects), per_type))


def popularity() -> list[tuple[str, str]]:
  """All (colour, shape) pairs, most frequent in the data set first (by their sampling weights)."""
  weights = {(c, s): cw * sw for c, cw in zip(COLOURS, COLOUR_WEIGHTS) for s, sw in zip(SHAPES, SHAPE_WEIGHTS)}
  return sorted(weights, key=lambda pair: -weights[pair])


def pope_probes(objects, rng) -> list[dict]:
  """POPE yes/no probes "Is there a red circle in the image?" per setting, half present, half absent."""
  present = sorted({(o.colour, o.shape) for o in objects})
  absent = [pair for pair in popularity() if pair not in present]
  k = min(POPE_PROBES, len(present))
  positives = _pick(rng, present, k)
  negatives = {
    "random": _pick(rng, absent, k),
    "popular": absent[:k],
    "adversarial": _pick(rng, [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)], k),
  }
  probes = []
  for setting in POPE_SETTINGS:
    for pairs, answer in ((positives, "yes"), (negatives[setting], "no")):
      for colour, shape in pairs:
        probes.append({"setting": setting, "object": f"{colour} {shape}", "answer": answer,
                 "question": f"Is there {article(f'{colour} {shape}')} in the image?"})
  return probes


def multiple_choice(vqa: list[dict], rng) -> list[dict]:
  """One 4-option question (options A-D, answer letter) per colour / shape / count question type."""
  vocabulary = {"colour": list(COLOURS), "shape": list(SHAPES), "count": [str(i) for i in range(5)]}
  questions = []
  for type_, words in vocabulary.items():
    same_type = [q for q in vqa if q["type"] == type_]
    if not same_type:
      continue
    question = same_type[0]
    distractors = [w for w in words if w != question["answer"]]
    options = _pick(rng, distractors, 3) + [question["answer"]]
    options = [options[i] for i in rng.permutation(4)]
    questions.append({"type": type_, "question": question["question"], "options": options,
              "answer": LETTERS[options.index(question["answer"])]})
  return questions


def grounding(objects) -> list[dict]:
  """A referring expression and box for every object some description picks out alone."""
  return [{"expression": f"the {phrase(_values(o, form))}", "box": list(o.box)}
      for o in objects if (form := _unique_form(o, objects, ANY_FORMS))]


def conversation(caption: str, vqa: list[dict], refs: list[dict], rng) -> list[dict]:
  """3 or 4 user/assistant turn pairs, in random order: a caption request, two VQA questions and a box
  request (when some object can be referred to); the image token opens the first user turn."""
  turns = [("Describe the image.", caption)] + [(q["question"], q["answer"]) for q in _pick(rng, vqa, 2)]
  if refs:
    ref = refs[rng.integers(len(refs))]
    turns.append((f"Where is {ref['expression']}?", str(ref["box"])))  # "[x0, y0, x1, y1]"
  return shuffled_conversation(turns, rng)


def ordered_conversation(turns: list[tuple[str, str]]) -> list[dict]:
  """(question, answer) turns in order as user/assistant messages; the image token opens the first user turn."""
  messages = []
  for i, (question, answer) in enumerate(turns):
    messages.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question})
    messages.append({"role": "assistant", "content": answer})
  return messages


def shuffled_conversation(turns: list[tuple[str, str]], rng: np.random.Generator) -> list[dict]:
  """(question, answer) turns in random order as user/assistant messages (`ordered_conversation`)."""
  return ordered_conversation([turns[index] for index in rng.permutation(len(turns))])


def annotate(objects: tuple[SceneObject, ...], rng: np.random.Generator, questions_per_type: int) -> dict:
  """Every annotation of one scene: {captions, vqa, pope, multiple_choice, grounding, conversation}."""
  texts = captions(objects)
  vqa = vqa_questions(objects, rng, questions_per_type)
  refs = grounding(objects)
  return {"captions": texts, "vqa": vqa, "pope": pope_probes(objects, rng),
      "multiple_choice": multiple_choice(vqa, rng), "grounding": refs,
      "conversation": conversation(texts[0], vqa, refs, rng)}
