"""Benchmark metrics: VQA accuracy, BLEU, CIDEr-D, POPE, multiple choice, grounding and retrieval.

Each metric reproduces the reference implementation the benchmark's papers report with:
- `vqa_accuracy`: the official VQA evaluation (GT-Vision-Lab/VQA `vqaEval.py`, current master).
- `bleu`, `cider`: coco-caption (pycocoevalcap) BLEU-1..4 and CIDEr-D on whitespace-tokenized text;
  `ptb_tokenize` is a pure-Python take on the Stanford PTBTokenizer pycocoevalcap runs before them.
- `pope`: the yes/no parsing and scores of the POPE and LLaVA evaluation scripts.
- `extract_choice`, `circular_rotations`, `circular_accuracy`: MMBench-style multiple choice (CircularEval).
- `box_iou`, `grounding_accuracy`, `retrieval_recall`, `zero_shot_accuracy`: numpy, no JAX.
"""

import re
from collections import defaultdict

import numpy as np

from vlmjax.eval.captions import bleu, cider, ptb_tokenize, ptb_tokenize_text  # noqa: F401 (the public names)

# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (vqaEval.py). The tables are the official ones, including their quirks: capitalized keys ("Im")
# never match after lowercasing, and "somebody'd" maps to "somebodyd".
# ---------------------------------------------------------------------------------------------------------------

_VQA_CONTRACTIONS = {
  "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
  "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
  "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
  "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
  "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
  "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
  "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
  "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
  "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
  "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
  "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
  "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
  "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
  "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
  "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
  "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
  "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
  "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
  "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
  "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
  "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
  "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
  "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
  "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
  "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
  "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
  "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
  "youve": "you've",
}
_VQA_NUMBER_WORDS = {
  "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
  "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = ("a", "an", "the")
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
# Verbatim from vqaEval.py: "(?!<=" is a lookahead, not a lookbehind, so any period not followed by a digit goes.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _vqa_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
  """processPunctuation: drop punctuation next to a space (or anywhere if `1,000` occurs), else space it."""
  drop = _VQA_COMMA_STRIP.search(text) is not None
  out = text
  for p in _VQA_PUNCTUATION:
    if drop or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # vqaEval.py passes re.UNICODE (= 32) where `sub` takes its count: at most 32 periods are removed.
  return _VQA_PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _vqa_digit_article(text: str) -> str:
  """processDigitArticle: lowercase, number words to digits, drop articles, restore contractions."""
  words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  words = [word for word in words if word not in _VQA_ARTICLES]
  return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
  """An answer as vqaEval.py normalizes it: whitespace, punctuation, then digits/articles/contractions."""
  return _vqa_digit_article(_vqa_punctuation(_vqa_whitespace(text)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """The official VQA accuracy of one prediction against the human answers (10 in VQAv2).

  min(1, matches / 3) averaged over the leave-one-out subsets of `answers`: 0, 0.3, 0.6, 0.9, 1.0 for 0..4+
  matching answers out of 10. As in vqaEval.py, answers and prediction are normalized (`normalize_vqa_answer`)
  only when the human answers disagree; when they all agree the comparison is exact after stripping whitespace.
  """
  if isinstance(answers, str) or not answers:
    raise ValueError(f"vqa_accuracy needs a non-empty list of reference answers, got {answers!r}")
  answers = [_vqa_whitespace(answer) for answer in answers]
  prediction = _vqa_whitespace(prediction)
  if len(set(answers)) > 1:
    answers = [normalize_vqa_answer(answer) for answer in answers]
    prediction = normalize_vqa_answer(prediction)
  matches = sum(answer == prediction for answer in answers)
  # Leaving out answer i leaves `matches - 1` matches if answer i matched, else `matches`.
  total = sum(min(1.0, (matches - (answer == prediction)) / 3) for answer in answers)
  return total / len(answers)


# ---------------------------------------------------------------------------------------------------------------
# POPE (object hallucination, yes/no questions).
# ---------------------------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
  """'yes' or 'no' from a free-text answer, as the POPE/LLaVA scorers read it.

  Only the first sentence counts (text before the first '.'); commas are removed; it is "no" when one of its
  space-separated words is exactly `No`, `no` or `not`, otherwise "yes".
  """
  first_sentence = text.split(".")[0].replace(",", "")
  words = first_sentence.split(" ")
  return "no" if "No" in words or "no" in words or "not" in words else "yes"


def pope(predictions: list[str], labels: list[str]) -> dict[str, float]:
  """accuracy, precision, recall, f1 (for "yes" as the positive class) and yes_ratio of free-text answers.

  predictions: model answers, read with `parse_yes_no`. labels: "yes"/"no". A ratio whose denominator is 0
  (no predicted or no true "yes") is 0.
  """
  if len(predictions) != len(labels) or not labels:
    raise ValueError(f"pope needs as many predictions as labels, and at least one: got {len(predictions)} "
             f"predictions and {len(labels)} labels")
  truth = []
  for i, label in enumerate(labels):
    label = str(label).strip().lower()
    if label not in ("yes", "no"):
      raise ValueError(f"POPE label {i} is {labels[i]!r}; labels must be 'yes' or 'no'")
    truth.append(label == "yes")
  said_yes = [parse_yes_no(prediction) == "yes" for prediction in predictions]
  true_pos = sum(p and t for p, t in zip(said_yes, truth))
  false_pos = sum(p and not t for p, t in zip(said_yes, truth))
  false_neg = sum(not p and t for p, t in zip(said_yes, truth))
  true_neg = len(truth) - true_pos - false_pos - false_neg
  precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
  recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (true_pos + true_neg) / len(truth), "precision": precision, "recall": recall, "f1": f1,
      "yes_ratio": sum(said_yes) / len(said_yes)}


def pope_by_split(predictions: list[str], labels: list[str], splits: list[str]) -> dict[str, float]:
  """`pope` over all questions (plain keys) and per split (`random/f1`, `popular/accuracy`, ...).

  splits: each question's POPE split name ("random", "popular", "adversarial").
  """
  if len(splits) != len(labels):
    raise ValueError(f"pope_by_split needs one split name per label: got {len(splits)} for {len(labels)}")
  results = pope(predictions, labels)
  for split in sorted(set(splits)):
    rows = [i for i, name in enumerate(splits) if name == split]
    scores = pope([predictions[i] for i in rows], [labels[i] for i in rows])
    results.update({f"{split}/{metric}": value for metric, value in scores.items()})
  return results


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice (MMBench CircularEval).
# ---------------------------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LAST_TOKENS = 3  # how far from the end a lone option letter is looked for


def extract_choice(response: str, options: list[str]) -> str | None:
  """The option letter ("A", "B", ...) a free-text answer picks, or None if it picks none unambiguously.

  Tried in order: "answer is B" / "Answer: (B)"; "B." or "B)" opening the answer; a single "(B)"; a single
  lone capital option letter among the last three words; the one option whose text the answer contains
  (case-insensitive, whole words; if several do, the one containing all the others).
  """
  letters = _LETTERS[:len(options)]
  found = re.search(r"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*\(?([A-Z])\)?(?![\w'])", response)
  if found and found.group(1) in letters:
    return found.group(1)
  found = re.match(r"\s*([A-Z])\s*[.):](?:\s|$)", response)
  if found and found.group(1) in letters:
    return found.group(1)
  in_parentheses = set(re.findall(r"\(([A-Z])\)", response)) & set(letters)
  if len(in_parentheses) == 1:
    return in_parentheses.pop()
  words = re.sub(r"[.()\[\],:;!?*#{}\"']", " ", response).split()
  lone = {word for word in words[-_LAST_TOKENS:] if len(word) == 1 and word in letters}
  if len(lone) == 1:
    return lone.pop()
  texts = [str(option).strip().lower() for option in options]
  contained = [i for i, text in enumerate(texts)
         if text and re.search(rf"(?<!\w){re.escape(text)}(?!\w)", response.lower())]
  for i in contained:
    if all(texts[j] in texts[i] for j in contained):
      return letters[i]
  return None


def circular_rotations(options: list[str], answer: str) -> list[tuple[list[str], str]]:
  """Every rotation of a question's options with its correct letter: `[(options, answer), ...]`, one per option.

  Rotation k asks `options[k:] + options[:k]`; the first is the question as given. E.g. (["x", "y", "z"], "B")
  gives (["x","y","z"], "B"), (["y","z","x"], "A"), (["z","x","y"], "C").
  """
  letters = _LETTERS[:len(options)]
  if not isinstance(answer, str) or len(answer) != 1 or answer not in letters:
    raise ValueError(f"answer {answer!r} is not one of the option letters {list(letters)}")
  correct = letters.index(answer)
  return [(list(options[k:]) + list(options[:k]), letters[(correct - k) % len(options)])
      for k in range(len(options))]


def circular_accuracy(question_ids: list, predictions: list[str | None], answers: list[str]) -> float:
  """MMBench CircularEval: a question counts right only if every one of its rotations is answered right.

  question_ids, predictions (letters or None) and answers (letters) hold one entry per rotation asked.
  """
  if not len(question_ids) == len(predictions) == len(answers) or not answers:
    raise ValueError(f"circular_accuracy needs matching non-empty lists: {len(question_ids)} question ids, "
             f"{len(predictions)} predictions, {len(answers)} answers")
  all_right: dict = defaultdict(lambda: True)
  for question_id, prediction, answer in zip(question_ids, predictions, answers):
    all_right[question_id] &= prediction == answer
  return sum(all_right.values()) / len(all_right)


# ---------------------------------------------------------------------------------------------------------------
# Grounding, retrieval and zero-shot classification.
# ---------------------------------------------------------------------------------------------------------------


def box_iou(boxes_a, boxes_b) -> float | np.ndarray:
  """Intersection over union of boxes `[x0, y0, x1, y1]`: float for two boxes, float64[...] for arrays [..., 4].

  Boxes with x1 < x0 or y1 < y0 have no area; two boxes without area have IoU 0.
  """
  a, b = np.asarray(boxes_a, np.float64), np.asarray(boxes_b, np.float64)
  if a.shape[-1:] != (4,) or b.shape[-1:] != (4,):
    raise ValueError(f"boxes must be [x0, y0, x1, y1] (last axis 4), got shapes {a.shape} and {b.shape}")

  def area(box):
    return np.clip(box[..., 2] - box[..., 0], 0, None) * np.clip(box[..., 3] - box[..., 1], 0, None)

  overlap = np.concatenate([np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])], axis=-1)
  intersection = area(overlap)
  union = area(a) + area(b) - intersection
  iou = np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)
  return float(iou) if iou.ndim == 0 else iou


def grounding_accuracy(pred_boxes, gt_boxes, threshold: float = 0.5) -> float:
  """Fraction of predicted boxes with IoU >= threshold against their ground truth (accuracy@0.5)."""
  iou = np.atleast_1d(box_iou(pred_boxes, gt_boxes))
  return float(np.mean(iou >= threshold))


def retrieval_recall(similarity, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
  """Recall@k both ways from an image-text similarity matrix.

  similarity: float[num_images, num_texts]. text_to_image: int[num_texts], the image each text describes (an
  image may have several). Image->text counts an image found at k if any of its texts ranks in the top k;
  text->image, if its image does. A tie with a wrong candidate counts against the model. Returns
  `image_to_text/r@k`, `text_to_image/r@k` and `r@k`, their mean.
  """
  similarity = np.asarray(similarity, np.float64)
  text_to_image = np.asarray(text_to_image)
  num_images, num_texts = similarity.shape if similarity.ndim == 2 else (None, None)
  if num_images is None or text_to_image.shape != (num_texts,):
    raise ValueError(f"similarity must be [num_images, num_texts] and text_to_image [num_texts]; got "
             f"{similarity.shape} and {text_to_image.shape}")
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
  matches = text_to_image[None, :] == np.arange(num_images)[:, None]  # bool[num_images, num_texts]
  if not matches.any(axis=1).all():
    raise ValueError(f"images {np.flatnonzero(~matches.any(axis=1))[:5].tolist()} have no text")
  best_image_to_text = np.where(matches, similarity, -np.inf).max(axis=1, keepdims=True)
  image_to_text_rank = np.sum(~matches & (similarity >= best_image_to_text), axis=1)
  correct_text_to_image = similarity[text_to_image, np.arange(num_texts)][None, :]
  text_to_image_rank = np.sum(~matches & (similarity >= correct_text_to_image), axis=0)
  results = {}
  for k in ks:
    image_to_text = float(np.mean(image_to_text_rank < k))
    text_to_image_recall = float(np.mean(text_to_image_rank < k))
    results[f"image_to_text/r@{k}"] = image_to_text
    results[f"text_to_image/r@{k}"] = text_to_image_recall
    results[f"r@{k}"] = (image_to_text + text_to_image_recall) / 2
  return results


def zero_shot_accuracy(image_embeddings, class_embeddings, labels) -> float:
  """Top-1 accuracy of classifying each image as its most cosine-similar class embedding.

  image_embeddings: float[N, D]. class_embeddings: float[C, D] (e.g. mean prompt embeddings). labels: int[N].
  """
  images = np.asarray(image_embeddings, np.float64)
  classes = np.asarray(class_embeddings, np.float64)
  labels = np.asarray(labels)
  if (images.ndim != 2 or classes.ndim != 2 or images.shape[1] != classes.shape[1]
      or labels.shape != images.shape[:1]):
    raise ValueError(f"need image_embeddings [N, D], class_embeddings [C, D] and labels [N]; got "
             f"{images.shape}, {classes.shape} and {labels.shape}")
  images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
  classes = classes / np.maximum(np.linalg.norm(classes, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.argmax(images @ classes.T, axis=1) == labels))
