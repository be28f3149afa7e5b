"""What the shapes VLM is trained on and asked: shapes records -> conversations, and images -> pixels.

Training shows each image with all its VQA questions plus one of its other tasks (a POPE probe, a multiple
choice, a caption or a box), as turns of one conversation in random order: one image encoding serves
several supervised answers.
"""

import numpy as np

from vlmjax.data.shapes_scene import COLOURS, IMAGE_TOKEN, SHAPES, SIZES, shuffled_conversation

CAPTION_PROMPT = "Describe the image."
# The object labels of an image, for supervised pretraining of the vision tower: which (shape, colour) pairs,
# shapes, colours and (size, shape) pairs it holds.
OBJECT_LABELS = ([f"{colour} {shape}" for shape in SHAPES for colour in COLOURS] + list(SHAPES) + list(COLOURS)
                 + [f"{size} {shape}" for size in SIZES for shape in SHAPES])
NUM_OBJECT_LABELS = len(OBJECT_LABELS)
_LABEL_INDEX = {label: i for i, label in enumerate(OBJECT_LABELS)}
OPTION_LETTERS = "ABCD"


def object_labels(record: dict) -> np.ndarray:
  """float32[NUM_OBJECT_LABELS]: 1 for each label (OBJECT_LABELS) that an object of the record's scene has."""
  labels = np.zeros(NUM_OBJECT_LABELS, np.float32)
  for obj in record["scene"]:
    for label in (f"{obj['colour']} {obj['shape']}", obj["shape"], obj["colour"], f"{obj['size']} {obj['shape']}"):
      labels[_LABEL_INDEX[label]] = 1
  return labels


def multiple_choice_prompt(question: str, options: list[str]) -> str:
  lines = [question] + [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options)]
  return "\n".join(lines + ["Answer with the option's letter."])


def grounding_prompt(expression: str) -> str:
  return f"Where is {expression}?"


def box_text(box) -> str:
  return "[" + ", ".join(str(int(c)) for c in box) + "]"


def other_tasks(record: dict) -> list[tuple[str, str]]:
  """(question, answer) pairs of the record's non-VQA tasks."""
  pairs = [(CAPTION_PROMPT, record["captions"][0])]
  pairs += [(probe["question"], probe["answer"]) for probe in record["pope"]]
  pairs += [(multiple_choice_prompt(q["question"], q["options"]), q["answer"]) for q in record["multiple_choice"]]
  pairs += [(grounding_prompt(g["expression"]), box_text(g["box"])) for g in record["grounding"]]
  return pairs


def training_messages(record: dict, rng: np.random.Generator) -> list[dict]:
  """All VQA turns and one other task, shuffled; the image placeholder leads the first user turn."""
  turns = [(q["question"], q["answer"]) for q in record["vqa"]]
  others = other_tasks(record)
  turns.append(others[rng.integers(len(others))])
  return shuffled_conversation(turns, rng)


def question_messages(question: str) -> list[dict]:
  """One user turn with the image first, as `VLM.generate` asks it."""
  return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
