"""The shapes data set: determinism, disjoint splits, and every annotation checked against the pixels.

The checks re-derive each object (colour, shape, size, box) from the rendered image with their own simple
logic, then answer every question from those objects; they share only the vocabulary (names and palette)
with the generator.
"""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmjax.data import shapes, shapes_scene, shapes_tasks
from vlmjax.data.tokenizer import Tokenizer

PALETTE = shapes_scene.COLOURS  # what each colour name means, in RGB
SHAPE_WORDS = set(shapes_scene.SHAPES)
SIZE_WORDS = {"small", "large"}
IMAGE_SIZE = shapes.get_config().image_size  # the size every split is drawn at


def tiny_config(seed=0):
  config = shapes.get_config()
  config.seed = seed
  config.questions_per_type = 2
  config.splits.train, config.splits.validation, config.splits.test = 60, 20, 20
  return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("shapes")
  shapes.build(out_dir, tiny_config())
  return out_dir


@pytest.fixture(scope="module")
def examples(built):
  examples = []
  for split in shapes.SPLITS:
    source = shapes.load(built, split)
    examples += [source[i] for i in range(len(source))]
  return examples


# ------------------------------------------------------------------------ objects seen in the pixels
def classify_shape(mask):
  """circle / square / triangle / diamond / star from the silhouette cropped to its box."""
  height, width = mask.shape
  bottom_runs = np.count_nonzero(np.diff(np.concatenate([[0], mask[-1].astype(int), [0]])) == 1)
  if mask.mean() > 0.95:
    return "square"
  if mask.mean() > 0.7:
    return "circle"
  if bottom_runs == 2:
    return "star"  # two legs
  if mask[-1].sum() > 0.7 * width and mask[0].sum() < 0.4 * width:
    return "triangle"  # point up, flat base
  assert mask[height // 2].sum() >= width - 1, "unknown silhouette"
  return "diamond"


def seen_objects(example):
  """Objects re-derived from the image: each box must hold exactly one palette colour whose pixels fill it
  tightly, and no palette pixel may lie outside every box."""
  image = example["image"].astype(int)
  size = image.shape[0]
  covered = np.zeros(image.shape[:2], bool)
  objects = []
  for declared in example["scene"]:
    x0, y0, x1, y1 = declared["box"]
    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, declared
    crop = image[y0:y1, x0:x1]
    colours = {name: (crop == rgb).all(-1) for name, rgb in PALETTE.items() if (crop == rgb).all(-1).any()}
    assert len(colours) == 1, f"box {declared['box']} holds colours {sorted(colours)}"
    (colour, mask), = colours.items()
    rows, cols = np.nonzero(mask)
    assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (0, 0, y1 - y0, x1 - x0), "box not tight"
    covered[y0:y1, x0:x1] = True
    objects.append({"shape": classify_shape(mask), "colour": colour,
            "size": "large" if max(mask.shape) >= 15 * size / 64 else "small", "box": [x0, y0, x1, y1]})
  palette_pixels = np.zeros(image.shape[:2], bool)
  for rgb in PALETTE.values():
    palette_pixels |= (image == rgb).all(-1)
  assert not (palette_pixels & ~covered).any(), "an object outside every box"
  assert image[~palette_pixels].max() <= shapes_scene.NOISE_MAX, "background brighter than noise"
  return objects


# ------------------------------------------------------------------------ answers from those objects
def parse(description):
  """"large red object" -> {"size": "large", "colour": "red"}; plural nouns ("circles") are accepted."""
  values = {}
  for word in description.split():
    if word in SIZE_WORDS:
      values["size"] = word
    elif word in PALETTE:
      values["colour"] = word
    elif word.rstrip("s") in SHAPE_WORDS:
      values["shape"] = word.rstrip("s")
    else:
      assert word in ("object", "objects"), f"unknown word {word!r} in {description!r}"
  return values


def matching(objects, description):
  values = parse(description)
  return [o for o in objects if all(o[key] == value for key, value in values.items())]


def the(objects, description):
  found = matching(objects, description)
  assert len(found) == 1, f"'the {description}' matches {len(found)} objects"
  return found[0]


def centre(obj):
  x0, y0, x1, y1 = obj["box"]
  return (x0 + x1) / 2, (y0 + y1) / 2


def centre_offset(objects, description, words):
  """(axis: 0 across, 1 down; the described object's box centre minus the image's centre on that axis) for a
  position question asked with `words` ("to the left or to the right of" or "above or below")."""
  axis = 0 if words.startswith("to") else 1
  offset = centre(the(objects, description))[axis] - IMAGE_SIZE / 2
  assert abs(offset) >= 1, "on the centre line"
  return axis, offset


def true_answer(question, objects):
  """The answer to a VQA question, worked out from the objects."""
  if m := re.fullmatch(r"What colour is the (.+)\?", question):
    return the(objects, m[1])["colour"]
  if m := re.fullmatch(r"What shape is the (.+)\?", question):
    return the(objects, m[1])["shape"]
  if m := re.fullmatch(r"What size is the (.+)\?", question):
    return the(objects, m[1])["size"]
  if m := re.fullmatch(r"How many (.+) are there\?", question):
    return str(len(matching(objects, m[1])))
  if m := re.fullmatch(r"Is there an? (.+?)( in the image)?\?", question):
    return "yes" if matching(objects, m[1]) else "no"
  if m := re.fullmatch(r"Is the (.+) (to the left or to the right of|above or below) the centre\?", question):
    axis, offset = centre_offset(objects, m[1], m[2])
    return ("left", "right", "above", "below")[2 * axis + (offset > 0)]
  if m := re.fullmatch(r"Is the centre (to the left or to the right of|above or below) the (.+)\?", question):
    axis, offset = centre_offset(objects, m[2], m[1])
    return ("left", "right", "above", "below")[2 * axis + (offset < 0)]
  if m := re.fullmatch(r"Is the (.+) to the left or to the right of the (.+)\?", question):
    a, b = the(objects, m[1]), the(objects, m[2])
    assert a["box"][2] < b["box"][0] or b["box"][2] < a["box"][0], "not clearly apart left-right"
    return "left" if centre(a)[0] < centre(b)[0] else "right"
  if m := re.fullmatch(r"Is the (.+) above or below the (.+)\?", question):
    a, b = the(objects, m[1]), the(objects, m[2])
    assert a["box"][3] < b["box"][1] or b["box"][3] < a["box"][1], "not clearly apart up-down"
    return "above" if centre(a)[1] < centre(b)[1] else "below"
  raise AssertionError(f"unknown question {question!r}")


# ------------------------------------------------------------------------ tests
def test_scene_matches_pixels(examples):
  counts = collections.Counter()
  for example in examples:
    assert example["image"].dtype == np.uint8 and example["image"].shape == (64, 64, 3)
    assert seen_objects(example) == example["scene"]
    assert 1 <= len(example["scene"]) <= 4
    counts.update(o["shape"] for o in example["scene"])
  assert set(counts) == SHAPE_WORDS


def test_captions_list_objects_left_to_right(examples):
  prefixes = r"(There (is|are) (?P<count>\d) shapes?: |From left to right: |An image of )?"
  for example in examples:
    objects = sorted(seen_objects(example), key=centre)
    described = [{key: o[key] for key in ("size", "colour", "shape")} for o in objects]
    assert example["caption"] == example["captions"][0] and len(example["captions"]) == 4
    for caption in example["captions"]:
      m = re.fullmatch(prefixes + r"(?P<listing>.+)\.", caption)
      assert m["count"] is None or int(m["count"]) == len(objects), caption
      names = [re.sub(r"^an? ", "", name.lower()) for name in re.split(r", | and ", m["listing"])]
      assert [parse(name) for name in names] == described, caption


def test_vqa_answers_are_true(examples):
  types = collections.Counter()
  for example in examples:
    objects = seen_objects(example)
    for q in example["vqa"]:
      assert q["answers"] == [q["answer"]] * 10 and re.fullmatch(r"[a-z0-9]+", q["answer"]), q
      assert q["answer"] == true_answer(q["question"], objects), (q, objects)
      types[q["type"], q["answer"] in ("yes", "no")] += 1
  assert {t for t, _ in types} == {"colour", "shape", "count", "existence", "relation"}
  assert types["existence", True] == sum(n for (t, _), n in types.items() if t == "existence")


@pytest.mark.parametrize("centre_first", [False, True])
def test_position_questions_are_true(examples, centre_first):
  rng = np.random.default_rng(0)
  answers = collections.Counter()
  for example in examples:
    objects = seen_objects(example)
    scene = shapes_tasks.scene_objects(example)
    every = shapes_scene.position_questions(scene, IMAGE_SIZE, rng, 100, centre_first)
    assert len(shapes_scene.position_questions(scene, IMAGE_SIZE, rng, 2, centre_first)) == min(2, len(every))
    for q in every:
      assert q["type"] == "position" and q["answer"] == true_answer(q["question"], objects), (q, objects)
      assert q["question"].startswith("Is the centre ") == centre_first
      answers[q["answer"]] += 1
  assert set(answers) == {"left", "right", "above", "below"}


def test_size_questions_are_true_and_describe_without_the_size(examples):
  answers, asked, possible = collections.Counter(), 0, 0
  for example in examples:
    objects = seen_objects(example)
    every = shapes_scene.size_questions(shapes_tasks.scene_objects(example))
    for q in every:
      description = re.fullmatch(r"What size is the (.+)\?", q["question"])[1]
      assert "size" not in parse(description), q  # the size is what is asked, never how the object is found
      assert q["type"] == "size" and q["answer"] == true_answer(q["question"], objects), (q, objects)
      answers[q["answer"]] += 1
    # One question per object that its colour, shape or both pick out alone, and none for the others.
    findable = [o for o in objects if any(len(matching(objects, " ".join(o[a] for a in form) + " object")) == 1
                                          for form in (("shape",), ("colour",), ("colour", "shape")))]
    assert len(every) == len(findable), (every, objects)
    drawn = shapes_scene.size_questions(shapes_tasks.scene_objects(example), np.random.default_rng(0), 1)
    assert len(drawn) == min(1, len(every)) and set(map(str, drawn)) <= set(map(str, every))
    asked, possible = asked + len(every), possible + len(objects)
  assert set(answers) == SIZE_WORDS and asked > possible / 2


def test_size_questions_join_training_conversations_only_when_asked_for(examples):
  record = examples[0]
  def turns(size_questions):
    messages = shapes_tasks.training_messages(record, np.random.default_rng(1), 3, 2, True, 1, "text", False,
                                              size_questions)
    return {(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(messages[::2], messages[1::2])}
  every = {(q["question"], q["answer"]) for q in shapes_scene.size_questions(shapes_tasks.scene_objects(record))}
  assert every, "the first example should have an object to ask about"
  assert not any(question.startswith("What size") for question, _ in turns(0))
  assert {turn for turn in turns(2) if turn[0].startswith("What size")} <= every
  assert len([turn for turn in turns(2) if turn[0].startswith("What size")]) == min(2, len(every))
  assert turns(0) - set(shapes_tasks.other_tasks(record)) <= turns(2)  # the same draw, then the size questions


def test_pope_negatives_absent_and_popular_negatives_frequent(examples):
  rng = np.random.default_rng(123)
  frequency = collections.Counter(
    (o.colour, o.shape) for _ in range(3000) for o in shapes_scene.sample_scene(rng, 64, 4, False)[0])
  top = {pair for pair, _ in frequency.most_common(12)}
  for example in examples:
    objects = seen_objects(example)
    present = {(o["colour"], o["shape"]) for o in objects}
    for setting in ("random", "popular", "adversarial"):
      probes = [p for p in example["pope"] if p["setting"] == setting]
      answers = collections.Counter(p["answer"] for p in probes)
      assert answers["yes"] == answers["no"] >= 1, probes
      for probe in probes:
        assert probe["answer"] == true_answer(probe["question"], objects), probe
        colour, shape = probe["object"].split()
        if probe["answer"] == "no":
          assert (colour, shape) not in present
          if setting == "popular":
            assert (colour, shape) in top, probe
          if setting == "adversarial":
            assert any(colour == c or shape == s for c, s in present), probe


def test_multiple_choice_letter_points_at_the_answer(examples):
  for example in examples:
    objects = seen_objects(example)
    for q in example["multiple_choice"]:
      truth = true_answer(q["question"], objects)
      assert len(set(q["options"])) == 4 and q["answer"] in "ABCD"
      assert [option == truth for option in q["options"]] == [letter == q["answer"] for letter in "ABCD"]


def test_grounding_boxes_match_pixels(examples):
  for example in examples:
    objects = seen_objects(example)
    describable = [o for o in objects if len(matching(objects, f"{o['size']} {o['colour']} {o['shape']}")) == 1]
    assert sorted(ref["box"] for ref in example["grounding"]) == sorted(o["box"] for o in describable)
    for ref in example["grounding"]:
      assert ref["expression"].startswith("the ")
      assert the(objects, ref["expression"][4:])["box"] == ref["box"]


def test_conversations_alternate_and_are_true(examples):
  for example in examples:
    objects = seen_objects(example)
    turns = example["conversation"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) >= 4
    assert turns[0]["content"].startswith("<image>\n")
    assert not any("<image>" in t["content"] for t in turns[1:])
    for user, assistant in zip(turns[::2], turns[1::2]):
      question = user["content"].removeprefix("<image>\n")
      if question == "Describe the image.":
        assert assistant["content"] == example["caption"]
      elif m := re.fullmatch(r"Where is the (.+)\?", question):
        assert assistant["content"] == str(the(objects, m[1])["box"])
      else:
        assert assistant["content"] == true_answer(question, objects)


def test_splits_share_no_scene(built):
  scenes = {}
  for split in ("train", "validation", "test"):
    source = shapes.load(built, split)
    scenes[split] = [json.dumps(source[i]["scene"], sort_keys=True) for i in range(len(source))]
    assert len(set(scenes[split])) == len(scenes[split]) == tiny_config().splits[split]
    assert [source[i]["image_id"] for i in range(len(source))] == list(range(len(source)))
  assert not set(scenes["train"]) & set(scenes["validation"])
  assert not set(scenes["train"]) & set(scenes["test"])
  assert not set(scenes["validation"]) & set(scenes["test"])


def test_two_builds_are_byte_identical(built, tmp_path):
  # The second build runs in a fresh process: protobuf map order differs between processes.
  code = ("import json, sys; from vlmjax.data import shapes; config = shapes.get_config(); "
      "config.update(json.loads(sys.argv[2])); shapes.build(sys.argv[1], config)")
  config = json.dumps(tiny_config().to_dict())
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(shapes.__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  subprocess.run([sys.executable, "-c", code, str(tmp_path), config], check=True, capture_output=True, env=env)
  first, second = built / "shapes" / shapes.VERSION, tmp_path / "shapes" / shapes.VERSION
  names = sorted(str(path.relative_to(first)) for path in first.rglob("*") if path.is_file())
  assert names == sorted(str(path.relative_to(second)) for path in second.rglob("*") if path.is_file())
  assert any(".array_record-" in name for name in names) and "tokenizer/tokenizer.json" in names
  for name in names:
    assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_tokenizer_keeps_punctuation_and_line_breaks_out_of_words(built):
  tokenizer = Tokenizer.from_directory(shapes.tokenizer_dir(built)).backend
  circle = tokenizer.token_to_id("▁circle")
  assert circle is not None
  for text in ["Is there a circle?", "A red circle.", "A circle, a star", "Is the circle?\nA. red\nB. blue"]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert circle in ids, [tokenizer.id_to_token(i) for i in ids]
  text = "USER: <image>\nWhat colour is the option's circle?\nA. red [12, 30] ASSISTANT: A</s>"
  assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
  assert tokenizer.encode(" ASSISTANT:", add_special_tokens=False).tokens == ["▁ASSISTANT:"]


def test_splits_skip_scenes_already_used_whatever_their_noise(monkeypatch):
  """One of 50 scenes each time, on a background of fresh noise: every image is new, most scenes are not."""
  draw = shapes_scene.sample_scene

  def one_of_50_scenes(rng, image_size, max_objects, noise):
    objects, image = draw(np.random.default_rng(int(rng.integers(50))), image_size, max_objects, False)
    background = (image == 0).all(-1)
    image[background] = rng.integers(0, shapes_scene.NOISE_MAX + 1, (int(background.sum()), 3), dtype=np.uint8)
    return objects, image

  monkeypatch.setattr(shapes_scene, "sample_scene", one_of_50_scenes)
  config = tiny_config()
  config.splits.train, config.splits.validation, config.splits.test = 20, 10, 10
  examples = [e for split in shapes.SPLITS for e in shapes.generate_split(config, split)]
  scenes = [e["scene"] for e in examples]
  assert len(scenes) == len(set(scenes)) == 40


def test_build_skips_same_config_and_refuses_another(built):
  shapes.build(built, tiny_config())  # already there: returns at once
  with pytest.raises(ValueError, match="another config"):
    shapes.build(built, tiny_config(seed=1))


def test_load_errors_name_the_problem(built, tmp_path):
  with pytest.raises(FileNotFoundError, match="vlmjax data build shapes"):
    shapes.load(tmp_path, "train")
  with pytest.raises(ValueError, match="unknown split"):
    shapes.load(built, "dev")


def test_render_grid_writes_a_png(examples, tmp_path):
  out_png = tmp_path / "grid.png"
  shapes.render_grid(examples[:6], out_png, columns=3)
  with Image.open(out_png) as grid:
    assert grid.width > 3 * 64 * 3 and grid.height > 2 * 64 * 3
