import collections
import itertools
import json

import numpy as np
import pytest

from vlmjax.data import pipeline, shapes, shapes_tasks
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer

TOKENS_PER_IMAGE = 16
IMAGE_TOKEN_ID = 3


@pytest.fixture(scope="module")
def data_dir(tiny_shapes_dir):
  return tiny_shapes_dir


@pytest.fixture(scope="module")
def tokenizer(data_dir):
  return Tokenizer.from_directory(shapes.tokenizer_dir(data_dir))


def _encoder(tokenizer, max_length=400):
  return pipeline.ConversationEncoder(tokenizer, IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, max_length)


def test_tokenizer_round_trips_the_data_sets_text(data_dir, tokenizer):
  source = shapes.load(data_dir, "validation")
  texts = [text for i in range(len(source)) for text in [source[i]["caption"]] +
           [q["question"] for q in source[i]["vqa"]] + [m["content"] for m in source[i]["conversation"]]]
  assert len(texts) > 50
  for text in texts:
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
  assert tokenizer.backend.token_to_id("<image>") == IMAGE_TOKEN_ID
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_loss_mask_covers_exactly_the_assistant_turns(data_dir, tokenizer):
  record = shapes.load(data_dir, "train")[0]
  messages = shapes_tasks.training_messages(record, np.random.default_rng(0))
  ids, assistant = _encoder(tokenizer)(messages)
  # The assistant tokens, read back in order, are the answers each followed by the end token.
  runs = [list(group) for is_assistant, group in itertools.groupby(zip(ids, assistant), key=lambda x: x[1])
          if is_assistant]
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  assert len(runs) == len(answers)
  for run, answer in zip(runs, answers):
    tokens = [token for token, _ in run]
    assert tokens[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokens[:-1]).strip() == answer
  # Nothing of the prompts (user turns, role names, image) is in the loss.
  assert not assistant[ids == IMAGE_TOKEN_ID].any()
  user_text = tokenizer.decode([t for t, a in zip(ids, assistant) if not a], skip_special_tokens=False)
  for message in messages:
    if message["role"] == "user":
      assert message["content"].replace("<image>", "") in user_text.replace("<image>", "")


def test_fresh_questions_are_drawn_from_the_scene_each_view(data_dir):
  record = shapes.load(data_dir, "train")[0]
  def questions(seed, per_type):
    messages = shapes_tasks.training_messages(record, np.random.default_rng(seed), per_type)
    return [(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(messages[::2], messages[1::2])]
  stored = {(q["question"], q["answer"]) for q in record["vqa"]}
  assert stored <= set(questions(0, 0))  # 0: the record's own questions (and one other task)
  first, second = questions(1, 3), questions(2, 3)
  assert first != second and len(first) > len(stored) + 1
  # The fresh questions are the scene generator's (so their answers are the scene's), plus one other task.
  from vlmjax.data import shapes_scene
  drawn = shapes_scene.vqa_questions(shapes_tasks.scene_objects(record), np.random.default_rng(1), 3)
  extra = set(first) - {(q["question"], q["answer"]) for q in drawn}
  assert len(first) == len(drawn) + 1 and len(extra) == 1 and extra <= set(shapes_tasks.other_tasks(record))


@pytest.mark.parametrize("centre_first", [False, True])
def test_position_questions_are_added_to_the_drawn_ones(data_dir, centre_first):
  record = shapes.load(data_dir, "train")[0]
  def turns(position_questions):
    messages = shapes_tasks.training_messages(record, np.random.default_rng(1), 3, position_questions, centre_first)
    return {(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(messages[::2], messages[1::2])}
  def names_centre(question):
    return question.startswith("Is the centre ") if centre_first else question.endswith(" the centre?")
  assert sum(names_centre(question) for question, _ in turns(2)) == 2
  assert not any(names_centre(question) for question, _ in turns(0))
  assert turns(0) - set(shapes_tasks.other_tasks(record)) <= turns(2)  # the same VQA draw, then the two


def test_the_other_turn_draws_each_task_equally_often(data_dir):
  record = shapes.load(data_dir, "train")[0]
  groups = shapes_tasks.other_task_groups(record)
  assert len(groups["pope"]) > 2 * len(groups["caption"])  # an image has far more probes than captions
  task_of = {pair: task for task, pairs in groups.items() for pair in pairs}
  counts = collections.Counter()
  for seed in range(400):
    messages = shapes_tasks.training_messages(record, np.random.default_rng(seed))
    turns = {(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(messages[::2], messages[1::2])}
    [other] = [pair for pair in turns if pair in task_of]
    counts[task_of[other]] += 1
  present = [task for task, pairs in groups.items() if pairs]
  assert set(counts) == set(present)
  for task in present:  # 400 draws at 1/len(present) each: within 4 standard deviations
    assert abs(counts[task] / 400 - 1 / len(present)) < 4 * (1 / len(present) / 400) ** 0.5


def test_more_other_turns_and_multiple_choice_answered_with_text_then_letter(data_dir):
  from vlmjax.eval import metrics
  record = shapes.load(data_dir, "train")[0]
  question = record["multiple_choice"][0]
  answer = shapes_tasks.choice_answer(question, "text_letter")
  text = question["options"][shapes_tasks.OPTION_LETTERS.index(question["answer"])]
  assert answer == f"{text}, {question['answer']}"
  assert metrics.extract_choice(answer, question["options"]) == question["answer"]  # the eval reads the letter
  assert shapes_tasks.choice_answer(question) == question["answer"]
  assert shapes_tasks.choice_answer(question, "text") == text
  assert metrics.extract_choice(text, question["options"]) == question["answer"]  # placed by the option it names
  with pytest.raises(ValueError, match="data.choice_answer='word'"):
    shapes_tasks.choice_answer(question, "word")
  groups = shapes_tasks.other_task_groups(record, "text_letter")
  others = {pair for pairs in groups.values() for pair in pairs}
  for other_turns in (1, 3):
    messages = shapes_tasks.training_messages(record, np.random.default_rng(5), 0, 0, False, other_turns, "text_letter")
    turns = [(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(messages[::2], messages[1::2])]
    assert sum(turn in others for turn in turns) == other_turns  # the record's VQA turns and the others drawn
    first = shapes_tasks.training_messages(record, np.random.default_rng(5), 0, 0, False, other_turns, "text_letter",
                                           others_first=True)
    opening = [(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(first[::2], first[1::2])]
    assert all(turn in others for turn in opening[:other_turns])  # the others open the conversation
    assert sorted(opening[other_turns:]) == sorted(turn for turn in turns if turn not in others)
    assert all(a == shapes_tasks.choice_answer(q, "text_letter") for q in record["multiple_choice"]
               for turn_q, a in turns if turn_q == shapes_tasks.multiple_choice_prompt(q["question"], q["options"]))


def test_expanded_placeholders_equal_the_image_token_count(data_dir, tokenizer):
  record = shapes.load(data_dir, "train")[1]
  ids, _ = _encoder(tokenizer)(shapes_tasks.training_messages(record, np.random.default_rng(1)))
  assert int(np.sum(ids == IMAGE_TOKEN_ID)) == TOKENS_PER_IMAGE
  image_positions = np.flatnonzero(ids == IMAGE_TOKEN_ID)
  assert np.all(np.diff(image_positions) == 1)  # one contiguous run


def test_example_targets_are_the_next_tokens():
  ids = np.array([5, 6, 7, 8], np.int32)
  assistant = np.array([False, False, True, True])
  example = pipeline.example_arrays(ids, assistant, np.zeros((2, 2, 3)))
  np.testing.assert_array_equal(example["targets"], [6, 7, 8, 0])
  np.testing.assert_array_equal(example["loss_mask"], [0, 1, 1, 0])


def test_a_template_without_the_expected_roles_fails_with_its_name(data_dir, tokenizer):
  broken = Tokenizer(tokenizer.backend, {"eos_token": "</s>"}, "{% for m in messages %}{{ m['role'] }}{% endfor %}",
                     name="broken-template")
  with pytest.raises(ValueError, match=r"does not contain the user turn .* expected roles"):
    _encoder(broken)([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
  with pytest.raises(ValueError, match=r"the chat template failed: shapes chat template: roles"):
    tokenizer.apply_chat_template([{"role": "system", "content": "x"}])


def _to_example(tokenizer, data_dir):
  encoder = _encoder(tokenizer, max_length=120)
  processor = ImageProcessor.from_directory(shapes.tokenizer_dir(data_dir))

  def to_example(record, rng):
    ids, assistant = encoder(shapes_tasks.training_messages(record, rng))
    return dict(pipeline.example_arrays(ids, assistant, processor([record["image"]])[0]),
                image_id=np.int32(record["image_id"]))
  return to_example


def test_restoring_the_iterator_state_continues_exactly(data_dir, tokenizer):
  source = shapes.load(data_dir, "train")
  dataset = pipeline.train_dataset(source, _to_example(tokenizer, data_dir), seed=3, batch_size=4, length=120)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(15)]  # crosses an epoch boundary (64 / 4 = 16 batches)
  resumed = iter(pipeline.train_dataset(source, _to_example(tokenizer, data_dir), seed=3, batch_size=4,
                                        length=120))
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(15)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_worker_processes_give_the_same_batches_and_their_state_restores_exactly(data_dir, tokenizer):
  source = shapes.load(data_dir, "train")
  make = lambda num_workers: iter(pipeline.train_dataset(source, _to_example(tokenizer, data_dir), seed=5,
                                                         batch_size=4, length=120, num_workers=num_workers))
  in_process = make(0)
  expected = [next(in_process) for _ in range(20)]  # crosses an epoch boundary (64 / 4 = 16 batches)
  with_workers = make(2)
  got = [next(with_workers) for _ in range(8)]
  state = json.loads(json.dumps(with_workers.get_state()))  # as the checkpoint stores it
  with_workers.close()
  resumed = make(2)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(12)]
  resumed.close()
  for want, batch in zip(expected, got, strict=True):
    for key in want:
      np.testing.assert_array_equal(batch[key], want[key])


def test_processes_read_disjoint_parts_that_cover_the_split(data_dir, tokenizer):
  source = shapes.load(data_dir, "train")
  seen = []
  for process in (0, 1):
    dataset = pipeline.train_dataset(source, _to_example(tokenizer, data_dir), seed=0, batch_size=4, length=120,
                                     process_index=process, process_count=2, num_epochs=1)
    seen.append([int(i) for batch in dataset for i in batch["image_id"]])
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(64))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bad_record_is_skipped_counted_and_named(data_dir, tokenizer, caplog, num_workers):
  source = shapes.load(data_dir, "train")

  class Corrupt:
    def __len__(self):
      return 8

    def __getitem__(self, index):
      record = source[index]
      if index == 5:
        record = dict(record, image=np.zeros((3,), np.uint8))  # not an image
      return record

  bad_records = pipeline.BadRecords()
  dataset = pipeline.train_dataset(Corrupt(), _to_example(tokenizer, data_dir), seed=0, batch_size=1, length=120,
                                   shuffle=False, num_epochs=1, source_name="corrupt.array_record",
                                   bad_records=bad_records, num_workers=num_workers)
  with caplog.at_level("WARNING"):
    ids = [int(batch["image_id"][0]) for batch in dataset]
  assert ids == [0, 1, 2, 3, 4, 6, 7] and bad_records.count == 1
  assert "skipping record 5 of corrupt.array_record" in caplog.text and "1 skipped so far" in caplog.text
