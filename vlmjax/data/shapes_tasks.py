"""What the shapes VLM is trained on and asked: shapes records -> conversations, and images -> pixels.

Training shows each image with VQA questions plus one of its other tasks (a POPE probe, a multiple choice, a
caption or a box; each task equally likely), as turns of one conversation in random order: one image encoding
serves several supervised answers. The questions are the record's own, or drawn afresh from its scene each
time the image is seen (`questions_per_type`): several yes/no and attribute questions about one image teach the
language model that the answer depends on the image far sooner than one of each.
"""

import numpy as np

from vlmjax.data import shapes_scene
from vlmjax.data.shapes_scene import COLOURS, IMAGE_TOKEN, SHAPES, SIZES, shuffled_conversation

CAPTION_PROMPT = "Describe the image."
# What each patch of an image shows, for supervised pretraining of the vision tower (`patch_groups`): the shape,
# colour and size of the object under the patch's centre, optionally which of `position_bins` strips of the
# image's width and of its height hold that object's box centre (class 0 of each group: no object is there), and
# whether the patch holds the centre of an object's box (class 1: one patch per object). With that last group an
# object is one token to count, not 1-4 (the main job's count accuracy: 0.906, against 0.84-0.88 without it).
# The position groups keep where each object is in the tokens the language model reads: without them the
# projector's output lost it (a linear probe's R² of an object token's column 0.09, with 4 bins 0.87), which
# relation questions need once trained long enough (experiments/shapes_tiny/README.md,
# 2026-12-02 relation-long).
PATCH_ATTRIBUTES = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "size": tuple(SIZES)}
OPTION_LETTERS = "ABCD"


def patch_groups(position_bins: int = 0) -> tuple[str, ...]:
  """The names of the label groups `patch_labels` gives, in order."""
  return (*PATCH_ATTRIBUTES, *(("column", "row") if position_bins else ()), "box centre")


def patch_classes(position_bins: int = 0) -> tuple[int, ...]:
  """The number of classes of each of `patch_groups(position_bins)`."""
  return (tuple(1 + len(values) for values in PATCH_ATTRIBUTES.values())
          + ((1 + position_bins,) * 2 if position_bins else ()) + (2,))


def patch_labels(record: dict, grid: int, position_bins: int = 0) -> np.ndarray:
  """int32[grid * grid, len(patch_classes(position_bins))], patches in raster order: for each patch of a
  grid x grid tiling of the record's image, 1 + the index of each attribute's value (and, with position_bins,
  1 + the strip across and down that holds the box centre) of the object whose box holds the patch's centre,
  0 where no object's box does (boxes never overlap); then 1 on the patch that holds the centre of an object's
  box, else 0."""
  size = record["image"].shape[0]
  cell = size / grid  # pixels per patch
  centres = (np.arange(grid) + 0.5) * cell  # pixel coordinate of each row/column's centre
  groups = len(patch_classes(position_bins))
  labels = np.zeros((grid, grid, groups), np.int32)
  for obj in record["scene"]:
    x0, y0, x1, y1 = obj["box"]
    inside = ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :]
    classes = [1 + values.index(obj[name]) for name, values in PATCH_ATTRIBUTES.items()]
    if position_bins:  # the strip across, then down, that holds the box centre
      classes += [1 + min(int((lo + hi) / 2 / size * position_bins), position_bins - 1)
                  for lo, hi in ((x0, x1), (y0, y1))]
    labels[inside, :-1] = classes
    labels[min(int((y0 + y1) / 2 / cell), grid - 1), min(int((x0 + x1) / 2 / cell), grid - 1), -1] = 1
  return labels.reshape(grid * grid, groups)


def multiple_choice_prompt(question: str, options: list[str]) -> str:
  lines = [question] + [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options)]
  return "\n".join(lines + ["Answer with the option's letter."])


def grounding_prompt(expression: str) -> str:
  return f"Where is {expression}?"


def box_text(box) -> str:
  return "[" + ", ".join(str(int(c)) for c in box) + "]"


# How a training conversation answers a multiple-choice question: "letter" ("A"), as the prompt asks;
# "text_letter" ("red, A"): the option's text, then its letter, so that the letter is the one before that same
# text among the options, a lookup of a token the model has just written; or "text" ("red"): the option's text
# alone, which the matching rules place by the option it names (`metrics.extract_choice`, as VLMEvalKit's
# `can_infer_text`), without the model naming a letter.
CHOICE_ANSWERS = ("letter", "text_letter", "text")


def choice_answer(question: dict, form: str = "letter") -> str:
  """The answer to a multiple-choice question ({question, options, answer: a letter}) in `form`."""
  if form not in CHOICE_ANSWERS:
    raise ValueError(f"data.choice_answer={form!r}: choose one of {CHOICE_ANSWERS}")
  letter = question["answer"]
  text = question["options"][OPTION_LETTERS.index(letter)]
  return {"letter": letter, "text_letter": f"{text}, {letter}", "text": text}[form]


def other_task_groups(record: dict, choice_form: str = "letter") -> dict[str, list[tuple[str, str]]]:
  """(question, answer) pairs of the record's non-VQA tasks, by task: caption, pope, multiple_choice, grounding;
  multiple-choice answers in `choice_form` (`choice_answer`)."""
  return {
    "caption": [(CAPTION_PROMPT, record["captions"][0])],
    "pope": [(probe["question"], probe["answer"]) for probe in record["pope"]],
    "multiple_choice": [(multiple_choice_prompt(q["question"], q["options"]), choice_answer(q, choice_form))
                        for q in record["multiple_choice"]],
    "grounding": [(grounding_prompt(g["expression"]), box_text(g["box"])) for g in record["grounding"]],
  }


def other_tasks(record: dict) -> list[tuple[str, str]]:
  """(question, answer) pairs of the record's non-VQA tasks."""
  return [pair for pairs in other_task_groups(record).values() for pair in pairs]


def scene_objects(record: dict) -> tuple[shapes_scene.SceneObject, ...]:
  """The record's scene (JSON) as the objects `shapes_scene` generated it from."""
  return tuple(shapes_scene.SceneObject(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in record["scene"])


def training_messages(record: dict, rng: np.random.Generator, questions_per_type: int = 0,
                      position_questions: int = 0, centre_first: bool = False, other_turns: int = 1,
                      choice_form: str = "letter", others_first: bool = False,
                      size_questions: int = 0) -> list[dict]:
  """VQA turns, up to `position_questions` questions of where an object lies against the image's centre
  (`shapes_scene.position_questions`, a training-only task), up to `size_questions` questions of an object's size
  (`shapes_scene.size_questions`, a task the main job never sees), and `other_turns` turns of other tasks (each
  task equally likely, each turn drawn afresh), shuffled; the image placeholder leads the first user turn. The VQA
  turns are the record's when questions_per_type is 0, else up to that many questions of each type drawn from
  its scene. `centre_first`: the position questions name the centre first and the object last
  (`shapes_scene.position_questions`). `choice_form`: how multiple-choice turns are answered (`choice_answer`).
  `others_first`: the other tasks' turns open the conversation and only the VQA turns are shuffled, so that a
  conversation cut at the training length loses VQA turns, of which there are many, and never the others."""
  objects = scene_objects(record)
  vqa = shapes_scene.vqa_questions(objects, rng, questions_per_type) if questions_per_type else record["vqa"]
  if position_questions:
    vqa = vqa + shapes_scene.position_questions(objects, record["image"].shape[0], rng, position_questions,
                                                centre_first)
  if size_questions:
    vqa = vqa + shapes_scene.size_questions(objects, rng, size_questions)
  turns = [(q["question"], q["answer"]) for q in vqa]
  # The task first, then one of its pairs. Drawn from all pairs at once, the POPE probes (up to 12 per image)
  # took 62% of these turns and the one caption 6%. Equal odds per task gave the main job (seeds 0 and 1)
  # shapes_vqa 0.797 and 0.773 against 0.775 and 0.753, CIDEr-D 3.74 and 3.56 against 2.95 and 2.45, and POPE F1
  # 0.851 and 0.831 against 0.833 and 0.805.
  tasks = [pairs for pairs in other_task_groups(record, choice_form).values() if pairs]
  others = []
  for _ in range(other_turns):
    pairs = tasks[rng.integers(len(tasks))]
    others.append(pairs[rng.integers(len(pairs))])
  if others_first:
    return shapes_scene.ordered_conversation(others + [turns[index] for index in rng.permutation(len(turns))])
  return shuffled_conversation(turns + others, rng)


def question_messages(question: str) -> list[dict]:
  """One user turn with the image first, as `VLM.generate` asks it."""
  return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
