"""Tests for vlmjax.eval.metrics against the reference implementations and hand-computed cases."""

import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlmjax.eval import metrics

# ---------------------------------------------------------------------------------------------------------------
# BLEU and CIDEr-D against pycocoevalcap.
# ---------------------------------------------------------------------------------------------------------------


def _random_corpus(seed: int) -> tuple[dict, dict]:
  """A corpus from a small vocabulary (so 3- and 4-grams match), with some degenerate captions mixed in."""
  rng = np.random.default_rng(seed)
  vocab = [f"w{i}" for i in range(int(rng.integers(3, 10)))]
  num_images = int(rng.integers(1, 9))
  refs, preds = {}, {}
  for image in range(num_images):
    refs[f"img{image}"] = [" ".join(rng.choice(vocab, int(rng.integers(1, 14))))
                 for _ in range(int(rng.integers(1, 6)))]
    kind = rng.integers(0, 6)
    if kind == 0:  # no overlap with any reference
      preds[f"img{image}"] = " ".join(["unseen"] * int(rng.integers(1, 6)))
    elif kind == 1:  # a copy of a reference
      preds[f"img{image}"] = refs[f"img{image}"][0]
    elif kind == 2:  # very short
      preds[f"img{image}"] = str(rng.choice(vocab))
    else:
      preds[f"img{image}"] = " ".join(rng.choice(vocab, int(rng.integers(2, 16))))
  return refs, preds


def _listed(preds: dict) -> dict:
  return {key: [value] for key, value in preds.items()}


@pytest.mark.parametrize("seed", range(40))
def test_bleu_and_cider_match_pycocoevalcap(seed):
  refs, preds = _random_corpus(seed)
  expected_bleu, _ = Bleu(4).compute_score(refs, _listed(preds), verbose=0)
  expected_cider, _ = Cider().compute_score(refs, _listed(preds))
  np.testing.assert_allclose(metrics.bleu(refs, preds), expected_bleu, rtol=0, atol=1e-6)
  assert metrics.cider(refs, preds) == pytest.approx(expected_cider, rel=0, abs=1e-6)


def test_random_corpora_are_not_trivial():
  """The corpora above must exercise real scores, not only zeros."""
  bleu4 = [metrics.bleu(*_random_corpus(seed))[3] for seed in range(40)]
  ciders = [metrics.cider(*_random_corpus(seed)) for seed in range(40)]
  assert sum(score > 0.05 for score in bleu4) >= 10
  assert sum(score > 0.5 for score in ciders) >= 10


@pytest.mark.parametrize("refs, preds", [
  ({1: ["a b c d"], 2: ["x y z"]}, {1: "e f g", 2: "q"}),  # nothing overlaps
  ({1: ["a b c d e"], 2: ["a b"]}, {1: "", 2: "a b"}),  # an empty candidate
  ({1: ["a b c", "a b c d e f g"]}, {1: "a b c d"}),  # one image: CIDEr's idf is 0
  ({1: ["a a a a", "a"], 2: ["a"]}, {1: "a a a a a a", 2: "a a"}),  # counts clipped by the references
  ({1: ["a b", "c d e f"], 2: ["b c"]}, {1: "a b c", 2: "b c"}),  # a tie for the closest reference length
])
def test_degenerate_corpora_match_pycocoevalcap(refs, preds):
  expected_bleu, _ = Bleu(4).compute_score(refs, _listed(preds), verbose=0)
  expected_cider, _ = Cider().compute_score(refs, _listed(preds))
  np.testing.assert_allclose(metrics.bleu(refs, preds), expected_bleu, rtol=0, atol=1e-6)
  assert metrics.cider(refs, preds) == pytest.approx(expected_cider, rel=0, abs=1e-6)


def test_bleu_by_hand():
  assert metrics.bleu({1: ["a b c d"]}, {1: "a b c d"}) == pytest.approx([1, 1, 1, 1], abs=1e-6)
  # Every unigram and the bigram match, but the candidate is half the reference: brevity penalty exp(1 - 4/2).
  b1, b2, _, _ = metrics.bleu({1: ["a b c d"]}, {1: "a b"})
  assert b1 == pytest.approx(math.exp(-1)) and b2 == pytest.approx(math.exp(-1))


def test_caption_metrics_reject_mismatched_ids():
  with pytest.raises(ValueError, match="same ids"):
    metrics.bleu({1: ["a"], 2: ["b"]}, {1: "a"})
  with pytest.raises(TypeError, match="one string"):
    metrics.cider({1: ["a"]}, {1: ["a"]})


# ---------------------------------------------------------------------------------------------------------------
# PTB tokenization. Expected outputs are what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1) returns.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption, expected", [
  ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
  ("Two dogs (one brown, one white) playing in the snow.",
   "two dogs -lrb- one brown one white -rrb- playing in the snow"),
  ("A man who doesn't want to eat his pizza, isn't he?", "a man who does n't want to eat his pizza is n't he"),
  ("It's a 10-year-old boy's bike; they're gonna ride it.",
   "it 's a 10-year-old boy 's bike they 're gon na ride it"),
  ('"Cannot" said the woman -- she won\'t go... really!', "can not said the woman she wo n't go really"),
  ("A sign that says: NO PARKING [tow-away zone].", "a sign that says no parking -lsb- tow-away zone -rsb-"),
  ("The kids' toys and the 'quoted' words", "the kids toys and the quoted words"),
  ("Mr. Smith bought 1,000 apples for $2.50 in the U.S. today.",
   "mr. smith bought 1,000 apples for $ 2.50 in the u.s. today"),
  ("I'd've said y'all at 5 p.m. o'clock", "i 'd 've said y' all at 5 p.m. o'clock"),
  ("A man\u2019s \u201cfavorite\u201d dog \u2014 a black-and-white one", "a man 's favorite dog a black-and-white one"),
  ("Cook 1 1/2 cups at 50% power, e.g. rice", "cook 1\u00a01/2 cups at 50 % power e.g. rice"),
  ("A TEDDY BEAR SITTING ON A BENCH.", "a teddy bear sitting on a bench"),
  ("A baseball player swinging a bat at a ball.A crowd watches",
   "a baseball player swinging a bat at a ball.a crowd watches"),
  ("rock 'n' roll in the '90s isn't dead", "rock 'n' roll in the '90s is n't dead"),
  ("two\nlines", "two lines"),
])
def test_ptb_tokenize_text_matches_stanford(caption, expected):
  assert metrics.ptb_tokenize_text(caption) == expected


def test_ptb_tokenize_keeps_the_shape_of_refs_and_preds():
  refs = metrics.ptb_tokenize({7: ["A dog.", "Don't!"], 8: ["It's red."]})
  preds = metrics.ptb_tokenize({7: "The dog, running.", 8: "red"})
  assert refs == {7: ["a dog", "do n't"], 8: ["it 's red"]}
  assert preds == {7: "the dog running", 8: "red"}


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (vqaEval.py).
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_vqa_accuracy_ladder(matches, expected):
  answers = ["red"] * matches + ["blue"] * (10 - matches)
  assert metrics.vqa_accuracy("red", answers) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
  ("1,000", "1000"),  # comma between digits: all punctuation is removed, not spaced
  ("2.5", "2.5"),  # a period before a digit stays
  ("dog.", "dog"),  # other periods go
  ("The Dog", "dog"),  # lowercase, articles dropped
  ("a dog and an apple", "dog and apple"),
  ("Two", "2"), ("ten", "10"), ("none", "0"),  # number words
  ("dont", "don't"), ("isnt", "isn't"), ("twas", "'twas"),  # contractions table
  ("Im", "im"),  # its capitalized keys never match after lowercasing
  ("yes, it is", "yes it is"),  # punctuation next to a space is removed
  ("hot-dog", "hot dog"), ("left/right", "left right"),  # ... elsewhere replaced by a space
  ("don't", "don't"),  # the apostrophe is not in the punctuation list
  ("  yes\n", "yes"),
])
def test_normalize_vqa_answer(text, expected):
  assert metrics.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("prediction, answer", [
  ("1,000", "1000"), ("2.5", "2.5"), ("A dog.", "dog"), ("two", "2"), ("dont", "don't"), ("Yes", "yes"),
  ("hot-dog", "hot dog"),
])
def test_vqa_accuracy_normalizes_when_answers_disagree(prediction, answer):
  answers = [answer] * 3 + ["something else"] * 7
  assert metrics.vqa_accuracy(prediction, answers) == pytest.approx(0.9)


def test_vqa_accuracy_compares_exactly_when_answers_agree():
  # vqaEval.py only normalizes when the 10 answers are not all the same.
  assert metrics.vqa_accuracy("two", ["2"] * 10) == 0.0
  assert metrics.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
  assert metrics.vqa_accuracy("2.5", ["25"] * 3 + ["3"] * 7) == 0.0
  with pytest.raises(ValueError, match="non-empty list"):
    metrics.vqa_accuracy("2", [])


# ---------------------------------------------------------------------------------------------------------------
# POPE.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
  ("Yes, there is a dog in the image.", "yes"),
  ("No, there is not.", "no"),
  ("There is no cat.", "no"),
  ("I do not see one", "no"),
  ("no.", "no"),
  ("Yes. No doubt about it.", "yes"),  # only the first sentence counts
  ("Not really", "yes"),  # "Not" capitalized is not in the scorer's word list
  ("nothing is there", "yes"),  # whole words only
])
def test_parse_yes_no(text, expected):
  assert metrics.parse_yes_no(text) == expected


def test_pope_by_hand():
  predictions = ["Yes.", "Yes, it is.", "No.", "No, there is none.", "yes", "There is no dog."]
  labels = ["yes", "no", "yes", "no", "yes", "no"]
  # said yes: T T F F T F; truth: T F T F T F -> TP 2, FP 1, FN 1, TN 2
  scores = metrics.pope(predictions, labels)
  assert scores == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                  "yes_ratio": 3 / 6})


def test_pope_by_split():
  predictions = ["yes", "yes", "no", "no"]
  labels = ["yes", "no", "no", "no"]
  scores = metrics.pope_by_split(predictions, labels, ["random", "random", "adversarial", "adversarial"])
  assert scores["random/precision"] == 0.5 and scores["random/recall"] == 1.0
  assert scores["random/f1"] == pytest.approx(2 / 3) and scores["random/yes_ratio"] == 1.0
  assert scores["adversarial/accuracy"] == 1.0 and scores["adversarial/f1"] == 0.0
  assert scores["accuracy"] == 0.75 and scores["f1"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="'yes' or 'no'"):
    metrics.pope(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice and CircularEval.
# ---------------------------------------------------------------------------------------------------------------

OPTIONS = ["a dog", "a cat", "a bird", "a fish"]


@pytest.mark.parametrize("response, expected", [
  ("B", "B"),
  ("(C) a bird", "C"),
  ("The answer is D.", "D"),
  ("Answer: (A)", "A"),
  ("B. A cat sits on the mat.", "B"),
  ("I think it is C", "C"),
  ("A cat is sitting on the mat.", "B"),  # the article "A" is not read as a letter; the option text is
  ("It shows a fish swimming", "D"),
  ("either A or B", None),
  ("The answer is E", None),  # not an option letter
  ("I cannot tell", None),
])
def test_extract_choice(response, expected):
  assert metrics.extract_choice(response, OPTIONS) == expected


def test_extract_choice_prefers_the_option_containing_the_others():
  assert metrics.extract_choice("It is dark red", ["red", "dark red", "blue"]) == "B"
  assert metrics.extract_choice("red or blue", ["red", "dark red", "blue"]) is None


def test_circular_rotations():
  assert metrics.circular_rotations(["x", "y", "z"], "B") == [
    (["x", "y", "z"], "B"), (["y", "z", "x"], "A"), (["z", "x", "y"], "C")]
  with pytest.raises(ValueError, match="option letters"):
    metrics.circular_rotations(["x", "y"], "C")


def test_circular_accuracy():
  question_ids, predictions, answers = [], [], []
  for question, (options, answer) in enumerate([(["dog", "cat", "bird"], "B"), (["red", "green"], "A")]):
    for rotated, letter in metrics.circular_rotations(options, answer):
      question_ids.append(question)
      answers.append(letter)
      # question 0 always answered by its content ("cat"); question 1 always "A", right once of twice
      predictions.append("ABC"[rotated.index("cat")] if question == 0 else "A")
  assert metrics.circular_accuracy(question_ids, predictions, answers) == 0.5
  assert metrics.circular_accuracy([0, 0, 1], ["A", None, "B"], ["A", "B", "B"]) == 0.5


# ---------------------------------------------------------------------------------------------------------------
# Grounding, retrieval and zero-shot classification.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("box_a, box_b, expected", [
  ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # overlap 1, union 4 + 4 - 1
  ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # one inside the other
  ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),
  ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching edges
  ([0, 0, 1, 1], [5, 5, 6, 6], 0.0),
  ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # no area
])
def test_box_iou(box_a, box_b, expected):
  assert metrics.box_iou(box_a, box_b) == pytest.approx(expected)
  assert metrics.box_iou(box_b, box_a) == pytest.approx(expected)


def test_grounding_accuracy_counts_iou_of_exactly_half():
  predicted = [[0, 0, 2, 1], [0, 0, 2, 2], [0, 0, 2, 2]]
  truth = [[0, 0, 1, 1], [0, 0, 2, 2], [1, 1, 3, 3]]  # IoU 0.5, 1, 1/7
  np.testing.assert_allclose(metrics.box_iou(predicted, truth), [0.5, 1.0, 1 / 7])
  assert metrics.grounding_accuracy(predicted, truth) == pytest.approx(2 / 3)


def test_retrieval_recall_by_hand():
  similarity = [[0.9, 0.1, 0.8, 0.3],
          [0.2, 0.7, 0.6, 0.5],
          [0.95, 0.4, 0.3, 0.1]]
  text_to_image = [0, 0, 1, 2]
  # image->text ranks (wrong texts scoring at least the best right one): 0, 1, 3
  # text->image ranks: 1, 2, 1, 2
  scores = metrics.retrieval_recall(similarity, text_to_image, ks=(1, 2, 5))
  assert scores["image_to_text/r@1"] == pytest.approx(1 / 3)
  assert scores["image_to_text/r@2"] == pytest.approx(2 / 3)
  assert scores["image_to_text/r@5"] == 1.0
  assert scores["text_to_image/r@1"] == 0.0
  assert scores["text_to_image/r@2"] == 0.5
  assert scores["r@1"] == pytest.approx(1 / 6)


def test_retrieval_recall_counts_ties_against_the_model():
  scores = metrics.retrieval_recall(np.ones((3, 3)), [0, 1, 2])
  assert scores["r@1"] == 0.0 and scores["r@5"] == 1.0 and set(scores) >= {"r@1", "r@5", "r@10"}
  identity = metrics.retrieval_recall(np.eye(3), [0, 1, 2])
  assert identity["image_to_text/r@1"] == identity["text_to_image/r@1"] == 1.0
  with pytest.raises(ValueError, match="no text"):
    metrics.retrieval_recall(np.eye(3)[:, :2], [0, 1])


def test_zero_shot_accuracy_uses_cosine_similarity():
  images = [[1.0, 0.5], [0.2, 1.0]]
  classes = [[10.0, 0.0], [0.0, 1.0]]  # a dot product would send image 1 to class 0
  assert metrics.zero_shot_accuracy(images, classes, [0, 1]) == 1.0
  assert metrics.zero_shot_accuracy(images, classes, [0, 0]) == 0.5
