"""Finetuning data sources (vlmjax.data.sources), from tiny LLaVA / COCO JSON files and PNGs written here, with a
tiny BPE tokenizer in the Hugging Face layout (trained as tests/interop/conftest.py's, without transformers)."""

import collections
import itertools
import json
import re
import string

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from vlmjax.data import pipeline, sources
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer

TOKENS_PER_IMAGE = 4
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
IMAGE_ID = SPECIALS.index("<image>")
BOS_ID, EOS_ID = SPECIALS.index("<s>"), SPECIALS.index("</s>")
# Hugging Face's llava-1.5-hf chat template, as the checkpoint ships it: no BOS, and no end token after answers.
HF_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# A LLaVA-style template that writes BOS, keeps parts in order and ends each answer with the end token itself.
EOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QUESTION, ANSWER = "What shape is it?", "A red circle."
QUESTION_2, ANSWER_2 = "And the colour?", "The circle is red."
CORPUS = [f"USER: ASSISTANT: {QUESTION} {ANSWER} {QUESTION_2} {ANSWER_2} caption en",
          "Describe the picture. Hello there. Hi! a blue square on grey; two dogs run", "more words here"] * 4
PROCESSOR = ImageProcessor(size={"height": 8, "width": 8})


def _tokenizer(directory, template) -> Tokenizer:
  """A BPE over CORPUS (every printable character in it), saved as a checkpoint's tokenizer with `template`."""
  backend = Backend(models.BPE(unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=list(SPECIALS),
                                                          initial_alphabet=list(string.printable),
                                                          show_progress=False))
  directory.mkdir()
  backend.save(str(directory / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "additional_special_tokens": ["<image>"], "add_bos_token": True, "add_eos_token": False}
  if template is not None:
    config["chat_template"] = template
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return Tokenizer.from_directory(str(directory))


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {name: _tokenizer(root / name, template)
          for name, template in [("hf", HF_LLAVA_TEMPLATE), ("eos", EOS_TEMPLATE), ("paligemma", None)]}


def _inputs(tokenizer, prefix_lm=False, max_length=96, images_per_example=1):
  return sources.ModelInputs(tokenizer, PROCESSOR, IMAGE_ID, TOKENS_PER_IMAGE, prefix_lm, max_length,
                             images_per_example)


def _png(path, colour):
  Image.fromarray(np.full((10, 12, 3), colour, np.uint8)).save(path)


@pytest.fixture
def image_dir(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  _png(folder / "a.png", 200)
  _png(folder / "b.png", 40)
  return folder


def _row(image="a.png", turns=((f"<image>\n{QUESTION}", ANSWER),), **extra):
  conversations = [{"from": who, "value": value} for turn in turns for who, value in zip(("human", "gpt"), turn)]
  return {"id": "r", **({"image": image} if image is not None else {}), "conversations": conversations, **extra}


def _source(tmp_path, image_dir, rows, name="llava.json"):
  path = tmp_path / name
  path.write_text(json.dumps(rows))
  return str(path), sources.open_source(sources.SourceSpec("llava", str(path), str(image_dir)))


def _loss_runs(example):
  """The target tokens under the loss, in runs of consecutive positions (of an example, or a batch's one row)."""
  example = {key: value.reshape(-1) for key, value in example.items() if key in ("targets", "loss_mask")}
  where = np.flatnonzero(example["loss_mask"] > 0)
  runs = [list(run) for _, run in itertools.groupby(where, key=lambda p, c=itertools.count(): p - next(c))]
  return [example["targets"][run] for run in runs]


@pytest.mark.parametrize("template", ["hf", "eos"])
def test_llava_loss_is_on_the_answers_and_their_end_token(tmp_path, image_dir, tokenizers_, template):
  tokenizer = tokenizers_[template]
  _, source = _source(tmp_path, image_dir, [_row(turns=((f"<image>\n{QUESTION}", ANSWER), (QUESTION_2, ANSWER_2)))])
  example = sources.example_fn("llava", _inputs(tokenizer))(source[0], np.random.default_rng(0))
  ids = example["input_ids"]
  runs = _loss_runs(example)
  assert len(runs) == 2
  for run, answer in zip(runs, [ANSWER, ANSWER_2]):
    assert run[-1] == EOS_ID and EOS_ID not in run[:-1]  # one end token, straight after the answer, trained
    assert tokenizer.decode(run[:-1]) == answer
  assert np.sum(ids == EOS_ID) == 2  # the template's own end tokens are not doubled
  # BOS once, first: the llava-1.5-hf template does not write it, so the tokenizer adds it (as transformers'
  # processor does); the other template writes it and gets no second.
  assert ids[0] == BOS_ID and np.sum(ids == BOS_ID) == 1
  placeholders = np.flatnonzero(ids == IMAGE_ID)
  assert len(placeholders) == TOKENS_PER_IMAGE and np.all(np.diff(placeholders) == 1)
  assert not example["loss_mask"][placeholders - 1].any()  # no loss on predicting a placeholder
  prompt = tokenizer.decode(ids[example["loss_mask"] == 0], skip_special_tokens=False)
  assert QUESTION in prompt and QUESTION_2 in prompt and "USER:" in prompt
  assert example["pixel_values"].shape == (1, 8, 8, 3)
  np.testing.assert_allclose(example["pixel_values"][0], PROCESSOR([np.full((10, 12, 3), 200, np.uint8)])[0])


def test_the_hf_template_gets_the_end_token_right_after_the_answer(tmp_path, image_dir, tokenizers_):
  tokenizer = tokenizers_["hf"]
  _, source = _source(tmp_path, image_dir, [_row()])
  example = sources.example_fn("llava", _inputs(tokenizer))(source[0], np.random.default_rng(0))
  text = tokenizer.decode(example["input_ids"], skip_special_tokens=False)
  assert text.endswith(f"ASSISTANT: {ANSWER}</s> ") or text.endswith(f"ASSISTANT: {ANSWER}</s>"), text


def test_text_only_rows_have_no_placeholders_and_zero_pixels(tmp_path, image_dir, tokenizers_):
  _, source = _source(tmp_path, image_dir, [_row(image=None, turns=(("Hello there.", "Hi!"),))])
  for name, prefix_lm in [("hf", False), ("paligemma", True)]:
    example = sources.example_fn("llava", _inputs(tokenizers_[name], prefix_lm))(source[0], np.random.default_rng(0))
    assert not (example["input_ids"] == IMAGE_ID).any()
    assert example["pixel_values"].shape == (1, 8, 8, 3) and not example["pixel_values"].any()
    assert tokenizers_[name].decode(_loss_runs(example)[-1]) == "Hi!"


def test_several_images_go_to_their_slots_in_order(tmp_path, image_dir, tokenizers_):
  rows = [_row(image=["a.png", "b.png"], turns=((f"<image>\n<image>\n{QUESTION}", ANSWER),))]
  _, source = _source(tmp_path, image_dir, rows)
  example = sources.example_fn("llava", _inputs(tokenizers_["eos"], images_per_example=3))(
      source[0], np.random.default_rng(0))
  assert np.sum(example["input_ids"] == IMAGE_ID) == 2 * TOKENS_PER_IMAGE
  pixels = example["pixel_values"]
  assert pixels.shape == (3, 8, 8, 3) and pixels[0, 0, 0, 0] > pixels[1, 0, 0, 0] and not pixels[2].any()


def _transformers_paligemma(tokenizer_dir):
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{tokenizer_dir}/tokenizer.json",
                                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  image_processor = transformers.SiglipImageProcessorPil(size={"height": 8, "width": 8})
  image_processor.image_seq_length = TOKENS_PER_IMAGE
  return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def test_paligemma_examples_are_what_its_processor_builds_for_training(tmp_path, image_dir, tokenizers_):
  tokenizer = tokenizers_["paligemma"]
  _, source = _source(tmp_path, image_dir, [_row(turns=((f"<image>\n{QUESTION}", ANSWER),))])
  example = sources.example_fn("llava", _inputs(tokenizer, prefix_lm=True))(source[0], np.random.default_rng(0))
  processor = _transformers_paligemma(tokenizer.name)
  expected = processor(text=QUESTION, images=Image.open(image_dir / "a.png"), suffix=ANSWER, return_tensors="np")
  np.testing.assert_array_equal(example["input_ids"], expected["input_ids"][0])
  assert example["prefix_lengths"] == np.sum(expected["token_type_ids"][0] == 0)  # the bidirectional part
  trained = expected["labels"][0] != -100  # the suffix: the answer and EOS
  np.testing.assert_array_equal(example["loss_mask"], np.append(trained[1:], False))  # each target's weight


def test_paligemma_draws_one_answer_with_the_turns_before_it_as_the_prefix(tmp_path, image_dir, tokenizers_):
  tokenizer = tokenizers_["paligemma"]
  rows = [_row(turns=((f"<image>\n{QUESTION}", ANSWER), (QUESTION_2, ANSWER_2)))]
  _, source = _source(tmp_path, image_dir, rows)
  to_example = sources.example_fn("llava", _inputs(tokenizer, prefix_lm=True))
  seen = {}
  for seed in range(12):
    example = to_example(source[0], np.random.default_rng(seed))
    prefix = example["input_ids"][:example["prefix_lengths"]]
    [suffix] = _loss_runs(example)
    assert suffix[-1] == EOS_ID and not example["loss_mask"][:example["prefix_lengths"] - 1].any()
    assert np.all(prefix[:TOKENS_PER_IMAGE] == IMAGE_ID) and prefix[TOKENS_PER_IMAGE] == BOS_ID
    seen[tokenizer.decode(suffix)] = tokenizer.decode(prefix, skip_special_tokens=False)
  assert seen[ANSWER].endswith(f"<s>{QUESTION}\n")
  assert seen[ANSWER_2].endswith(f"<s>{QUESTION}\n{ANSWER}\n{QUESTION_2}\n")


def _pretrain_row():
  return {"id": "p", "image": "a.png", "conversations": [
      {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
      {"from": "gpt", "value": "a blue square on grey"}]}


def _coco(tmp_path, captions=("a blue square on grey", "two dogs run")):
  path = tmp_path / "captions.json"
  path.write_text(json.dumps({"images": [{"id": 7, "file_name": "b.png"}],
                              "annotations": [{"image_id": 7, "id": i, "caption": c} for i, c in enumerate(captions)]}))
  return str(path)


def test_pretrain_and_coco_captions_are_rendered_plain(tmp_path, image_dir, tokenizers_):
  tokenizer = tokenizers_["hf"]
  path, _ = _source(tmp_path, image_dir, [_pretrain_row()])
  records = {"llava_pretrain": sources.open_source(sources.SourceSpec("llava_pretrain", path, str(image_dir)))[0],
             "coco": sources.open_source(sources.SourceSpec("coco", _coco(tmp_path), str(image_dir)))[0]}
  captions = collections.defaultdict(set)
  for kind, record in records.items():
    for seed in range(8):
      example = sources.example_fn(kind, _inputs(tokenizer))(record, np.random.default_rng(seed))
      ids = example["input_ids"]
      # LLaVA's preprocess_plain: BOS, the image, the caption and "\n"; the loss on the caption and "\n".
      assert ids[0] == BOS_ID and np.all(ids[1:1 + TOKENS_PER_IMAGE] == IMAGE_ID)
      assert not example["loss_mask"][:TOKENS_PER_IMAGE].any() and example["loss_mask"][TOKENS_PER_IMAGE] == 1
      [run] = _loss_runs(example)
      np.testing.assert_array_equal(run, ids[1 + TOKENS_PER_IMAGE:])
      caption = tokenizer.decode(run)
      assert caption.endswith("\n")
      captions[kind].add(caption.removesuffix("\n"))
  assert captions == {"llava_pretrain": {"a blue square on grey"}, "coco": {"a blue square on grey", "two dogs run"}}


def test_paligemma_captions_use_the_caption_prompt(tmp_path, image_dir, tokenizers_):
  tokenizer = tokenizers_["paligemma"]
  record = sources.open_source(sources.SourceSpec("coco", _coco(tmp_path, ["two dogs run"]), str(image_dir)))[0]
  example = sources.example_fn("coco", _inputs(tokenizer, prefix_lm=True))(record, np.random.default_rng(0))
  prefix = example["input_ids"][:example["prefix_lengths"]]
  assert tokenizer.decode(prefix, skip_special_tokens=False) == "<image>" * TOKENS_PER_IMAGE + "<s>caption en\n"
  assert tokenizer.decode(_loss_runs(example)[0], skip_special_tokens=False) == "two dogs run</s>"


def _mixed(tmp_path, image_dir, tokenizer, **options):
  """Two sources: 'red' answers (weight 3) and 'blue' ones (weight 1), eight rows each."""
  specs = []
  for name, answer, weight in [("red.json", "A red circle.", 3), ("blue.json", "a blue square on grey", 1)]:
    rows = [_row(image=["a.png", None][i % 2], turns=((f"{'<image>' * (i % 2 == 0)}{QUESTION} {i}", answer),))
            for i in range(8)]  # every row different, half of them text-only
    path, _ = _source(tmp_path, image_dir, rows, name)
    specs.append(sources.SourceSpec("llava", path, str(image_dir), weight))
  options = dict(dict(seed=1, batch_size=4, length=64, prefetch=0), **options)
  return sources.train_dataset(specs, _inputs(tokenizer, max_length=64), **options)


def test_sources_are_mixed_by_weight(tmp_path, image_dir, tokenizers_):
  iterator = iter(_mixed(tmp_path, image_dir, tokenizers_["hf"]))
  batches = [next(iterator) for _ in range(100)]
  assert batches[0]["input_ids"].shape == (4, 64) and batches[0]["pixel_values"].shape == (4, 1, 8, 8, 3)
  assert batches[0]["input_mask"].dtype == bool and "prefix_lengths" not in batches[0]
  answers = [tokenizers_["hf"].decode(_loss_runs({key: value[row] for key, value in batch.items()})[0])
             for batch in batches for row in range(4)]
  assert set(answers) == {"A red circle.", "a blue square on grey"}
  reds = answers.count("A red circle.")
  # grain's mix interleaves by weight deterministically (3 red, 1 blue, in turn), not by a random draw: 400
  # examples hold 300 red ones exactly, give or take the one cycle a start between cycles could split.
  assert abs(reds - 300) <= 1, reds


def test_the_iterator_state_resumes_the_same_batches(tmp_path, image_dir, tokenizers_):
  iterator = iter(_mixed(tmp_path, image_dir, tokenizers_["hf"], prefetch=2))
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it
  expected = [next(iterator) for _ in range(6)]  # past the end of the first pass over the 8 blue rows
  resumed = iter(_mixed(tmp_path, image_dir, tokenizers_["hf"], prefetch=2))
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(6)], strict=True):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  fresh = iter(_mixed(tmp_path, image_dir, tokenizers_["hf"], prefetch=2))
  assert not np.array_equal(next(fresh)["input_ids"], expected[0]["input_ids"])  # the state did the resuming


def test_processes_deal_out_one_global_order(tmp_path, image_dir, tokenizers_):
  whole = iter(_mixed(tmp_path, image_dir, tokenizers_["hf"], batch_size=4))
  parts = [iter(_mixed(tmp_path, image_dir, tokenizers_["hf"], batch_size=2, process_index=p, process_count=2))
           for p in (0, 1)]
  for _ in range(3):
    batch, halves = next(whole), [next(part) for part in parts]
    for key in batch:  # process p has rows p, p + 2 of the global batch
      np.testing.assert_array_equal(batch[key][0::2], halves[0][key])
      np.testing.assert_array_equal(batch[key][1::2], halves[1][key])


def test_packed_rows_meet_each_example_with_its_own_image(tmp_path, image_dir, tokenizers_):
  iterator = iter(_mixed(tmp_path, image_dir, tokenizers_["hf"], packing=True, batch_size=2, length=96))
  text_before_image = 0  # rows where a text-only example precedes one with an image: a zero image slot for the
                         # text-only one would hand the next example's placeholders that zero image
  for batch in [next(iterator) for _ in range(4)]:
    assert batch["pixel_values"].shape == (2, 96 // TOKENS_PER_IMAGE, 8, 8, 3)
    for row in range(2):
      segment_ids, ids = batch["segment_ids"][row], batch["input_ids"][row]
      with_image = [bool(np.any(ids[segment_ids == s] == IMAGE_ID)) for s in range(1, segment_ids.max() + 1)]
      text_before_image += any(not first and second for first, second in itertools.combinations(with_image, 2))
      used = batch["pixel_values"][row].reshape(96 // TOKENS_PER_IMAGE, -1).any(axis=1)
      assert used.sum() == sum(with_image) and not used[sum(with_image):].any()  # the images first, no gaps
  assert text_before_image, "the test wants a text-only example before one with an image in some row"


def test_prefix_lm_examples_are_batched_with_prefix_lengths_and_not_packed(tmp_path, image_dir, tokenizers_):
  path, _ = _source(tmp_path, image_dir, [_row()] * 3)
  specs = [sources.SourceSpec("llava", path, str(image_dir))]
  inputs = _inputs(tokenizers_["paligemma"], prefix_lm=True, max_length=64)
  batch = next(iter(sources.train_dataset(specs, inputs, seed=0, batch_size=2, length=64, prefetch=0)))
  assert batch["prefix_lengths"].dtype == np.int32 and batch["prefix_lengths"].shape == (2,)
  assert np.all(batch["prefix_lengths"] == TOKENS_PER_IMAGE + 1 + len(tokenizers_["paligemma"].encode(
      QUESTION + "\n", add_special_tokens=False)))
  with pytest.raises(ValueError, match="packing prefix-LM"):
    sources.train_dataset(specs, inputs, seed=0, batch_size=2, length=64, packing=True)


BAD_ROWS = {  # row -> what the log says about it
    1: ("missing.png", r"the image missing.png is not in"),
    2: ("corrupt.png", r"corrupt.png: not a decodable image"),
    3: ("no answer", r"no gpt \(assistant\) turn"),
    4: ("more tags than images", r"2 <image> tags in the human turns for 1 images"),
    5: ("an image without a tag", r"0 <image> tags in the human turns for 1 images"),
    6: ("too long", r"tokens, more than max_length=64 \(skipped, not truncated\)"),
    7: ("unknown speaker", r"unknown speaker 'system'"),
}


def test_bad_rows_are_skipped_counted_and_logged_with_file_and_row(tmp_path, image_dir, tokenizers_, caplog):
  (image_dir / "corrupt.png").write_bytes(b"not a png")
  rows = [_row(),
          _row(image="missing.png"),
          _row(image="corrupt.png"),
          {"id": "q", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
          _row(turns=((f"<image>\n<image>\n{QUESTION}", ANSWER),)),
          _row(turns=((QUESTION, ANSWER),)),
          _row(turns=((f"<image>\n{QUESTION}", " ".join([ANSWER] * 30)),)),
          _row(turns=((f"<image>\n{QUESTION}", ANSWER),)) | {"conversations": [{"from": "system", "value": "x"}]},
          _row(image=None, turns=(("Hello there.", "Hi!"),))]
  path, _ = _source(tmp_path, image_dir, rows)
  bad_records = pipeline.BadRecords()
  specs = [sources.SourceSpec("llava", path, str(image_dir))]
  dataset = sources.train_dataset(specs, _inputs(tokenizers_["hf"], max_length=64), seed=0, batch_size=1, length=64,
                                  bad_records=bad_records, prefetch=0)
  with caplog.at_level("WARNING"):
    iterator = iter(dataset)
    answers = [tokenizers_["hf"].decode(_loss_runs(next(iterator))[0][:-1]) for _ in range(5)]  # into pass 3
  assert set(answers) == {ANSWER, "Hi!"}  # the good rows keep coming
  skipped = [record.getMessage() for record in caplog.records if "skipping record" in record.getMessage()]
  assert len(skipped) == bad_records.count >= 2 * len(BAD_ROWS)  # two passes over the file at least
  for row, (what, error) in BAD_ROWS.items():
    lines = [line for line in skipped if line.startswith(f"skipping record {row} of {path} (")]
    assert lines, f"row {row} ({what}) is not logged"
    assert all(re.search(error, line) for line in lines), (what, lines)
  assert not any(line.startswith(("skipping record 0 ", "skipping record 8 ")) for line in skipped)


@pytest.mark.parametrize("spec, error", [
    ("", r"names no data"),
    ("llava:a.json", r"entry 0 \('llava:a.json'\): expected KIND:JSON_PATH:IMAGE_DIR"),
    ("llava:a.json:img,", r"entry 1 \(''\): expected"),
    ("llava:a.json:img:2:x", r"entry 0 .*expected"),
    ("coco:a.json:img,vqa:b.json:img", r"entry 1 \('vqa:b.json:img'\): unknown kind 'vqa'; choose one of llava, "
                                       r"llava_pretrain, coco"),
    ("llava:a.json:img:heavy", r"entry 0 .*the weight 'heavy' is not a number"),
    ("llava:a.json:img:0", r"the weight must be a positive number, got '0'"),
    ("llava:a.json:img:-1", r"positive"),
    ("llava:a.json:img:nan", r"positive"),
])
def test_parse_sources_errors_name_the_entry(spec, error):
  with pytest.raises(ValueError, match=error):
    sources.parse_sources(spec)


def test_parse_sources():
  assert sources.parse_sources("llava:/d/mix665k.json:/d/images:3, coco:/c/captions.json:/c/train2017") == [
      sources.SourceSpec("llava", "/d/mix665k.json", "/d/images", 3.0),
      sources.SourceSpec("coco", "/c/captions.json", "/c/train2017", 1.0)]
