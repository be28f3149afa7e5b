"""Caption metrics as coco-caption (pycocoevalcap) computes them: BLEU-1..4 and CIDEr-D on whitespace-tokenized
text, and `ptb_tokenize`, a pure-Python take on the Stanford PTBTokenizer that pycocoevalcap runs first (so no
Java is needed).
"""

import math
import re
from collections import Counter

import numpy as np

# pycocoevalcap's PUNCTUATIONS. The Stanford tokenizer runs with -lowerCase, so brackets come out as "-lrb-" and
# are *not* dropped by this list; we keep that behaviour.
_PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                 "-", "--", "...", ";"])
_PTB_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_PTB_CURRENCY = {"\u20ac": "$", "\u00a3": "#", "\u00a2": "cents"}
_LETTER, _ALNUM = r"[^\W\d_]", r"[^\W_]"
# Abbreviations that keep their period (PTBLexer ABBREV1 and ABBREV2: single letters, acronyms, titles, months,
# days, states, companies, units).
_PTB_ABBREVIATION = (r"(?:[^\W\d_](?:\.[^\W\d_])*|mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|"
           r"adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|vs|alex|"
           r"wm|jos|cie|cf|treas|invt|elec|natl|m[ft]g|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|"
           r"tues?|wed|thu|thurs|fri|ala|ariz|calif|colo|conn|dak|del|fla|ga|ind|kans?|ky|la|md|mich|minn|"
           r"mo|mont|neb|nev|okla|pa|penn|tenn|tex|va|vt|wisc?|wyo|jr|sr|bros|blvd|rd|esq|inc|cos?|corp|"
           r"pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|prop|ph|tel|est|ext|sq|ft|etc|al|seq)\.")


def _ptb_rules() -> list[tuple[re.Pattern, str]]:
  """(pattern, kind) in PTBLexer's order; group 1, where present, is the token and the rest trailing context."""
  rules = [
    (r"(can)not|(gon)na|(got)ta|(wan)na|(gim)me|(lem)me", "split"),  # "cannot" -> "can not", "gonna" ...
    (rf"({_LETTER}+)'(?:[msd]|re|ve|ll)", "split"),  # "it's" -> "it" + "'s"
    (rf"({_LETTER}*[a-mo-z])n't", "split"),  # "don't" -> "do" + "n't", "can't" -> "ca" + "n't"
    (rf"{_LETTER}+(?:[.!?]{_LETTER}+)*", "word"),
    (rf"'n'?|'em|'till?|'cause|'[2-9]0s|c'mon|ol'|{_LETTER}+[aeiouy]'[aeiou]{_LETTER}*", "word"),
    (rf"(y'){_LETTER}", "split"),  # "y'all" -> "y'" + "all"
    (r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)", "word"),  # numbers: 1,000 2.5 12:30 -5
    (r"(?:\d{1,4}[- \u00a0])?\d{1,4}/\d{1,4}", "fraction"),  # "1 1/2" is one token
    (rf"{_ALNUM}+(?:-{_LETTER}+){{0,2}}(?:/{_ALNUM}+(?:-{_LETTER}+){{0,2}}){{1,2}}", "word"),  # x/y, and/or
    (rf"{_ALNUM}(?:{_ALNUM}|[.,])*(?:-{_ALNUM}+)+", "word"),  # 10-year-old, 2.5-inch
    (rf"(?:[dol]'{_ALNUM})?{_ALNUM}+(?:[-_](?:[dol]'{_ALNUM})?{_ALNUM}+)*", "word"),  # o'clock, 3rd, a_b
    (rf"[#@]{_LETTER}\w*", "word"),  # #hashtag, @user (but "#1" is "#" "1")
    (_PTB_ABBREVIATION, "word"),
    (r"(nos?\.)\s*\d", "split"),  # "No. 5" (but "No." elsewhere is a word and a period)
    (rf"({_LETTER}+\.)[,;:]", "split"),  # a word's period stays before , ; :
    (r"('(?:[msd]|re|ve|ll))(?:[^a-z]|$)", "split"),  # a lone "'s"
    (r"n't", "word"),
    (r"('\d\d)(?:\s|$)", "split"),  # "'90"
    (r"[-\u2013\u2014\u2015]+", "dash"),
    (r"\.{3,5}|\u2026", "ellipsis"),
    (r"(')[a-z][^\s]", "split"),  # an opening quote: "'nice" is "'" "nice", not "'n" "ice"
    (r"''|``|[\"'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2039\u203a\u00ab\u00bb]", "quote"),
    (r"[?!]+|#+|@+|_+|\*+", "word"),
    (r"\S", "symbol"),
  ]
  return [(re.compile(pattern, re.IGNORECASE), kind) for pattern, kind in rules]


_PTB_RULES = _ptb_rules()


def _ptb_tokens(line: str) -> list[str]:
  """Tokens of one line, scanned as JFlex does: the longest match wins, ties go to the earlier rule."""
  tokens, position = [], 0
  while position < len(line):
    if line[position].isspace():
      position += 1
      continue
    best, best_kind = None, None  # the last rule matches any character, so best is set below
    for pattern, kind in _PTB_RULES:
      match = pattern.match(line, position)
      if match and (best is None or match.end() > best.end()):
        best, best_kind = match, kind
    text = best.group(0)
    if best_kind == "split":
      text = next(group for group in best.groups() if group is not None)
    elif best_kind == "fraction":
      text = text.replace(" ", "\u00a0")  # as PTBTokenizer's normalizeSpace does
    elif best_kind == "dash":
      text = "--" if len(text) in (3, 4) or text[0] != "-" else text
    elif best_kind == "ellipsis":
      text = "..."
    elif best_kind == "quote":
      text = "''"
    elif best_kind == "symbol":
      text = _PTB_BRACKETS.get(text, _PTB_CURRENCY.get(text, text))
    tokens.append(text)
    position = best.start() + len(text) if best_kind == "split" else best.end()
  return tokens


def ptb_tokenize_text(text: str) -> str:
  """One caption as pycocoevalcap's PTBTokenizer returns it: lowercased PTB tokens, punctuation dropped.

  A pure-Python version of Stanford PTBTokenizer (CoreNLP 3.4.1, `-preserveLines -lowerCase`) covering what
  captions contain: words, numbers (`1,000`, `2.5`), hyphenated words, contractions (`don't` -> `do n't`,
  `it's` -> `it 's`, `cannot` -> `can not`), abbreviations (`mr.`, `u.s.`), quotes, brackets (`-lrb-`),
  dashes and ellipses. Rare constructs (URLs, e-mail addresses, SGML tags) are not special-cased.
  """
  line = text.replace("\n", " ").replace("\u2018", "'").replace("\u2019", "'")  # curly apostrophes are apostrophes
  tokens = (token.lower() for token in _ptb_tokens(line))
  return " ".join(token for token in tokens if token not in _PTB_PUNCTUATIONS)


def ptb_tokenize(captions: dict) -> dict:
  """`ptb_tokenize_text` over `{id: caption}` or `{id: [caption, ...]}`; keeps the shape of each value."""
  return {key: ptb_tokenize_text(value) if isinstance(value, str) else [ptb_tokenize_text(v) for v in value]
      for key, value in captions.items()}


def _check_captions(refs: dict, preds: dict) -> None:
  if set(refs) != set(preds):
    missing, extra = sorted(map(str, set(refs) - set(preds))), sorted(map(str, set(preds) - set(refs)))
    raise ValueError(f"refs and preds must have the same ids; without a prediction: {missing[:5]}, "
             f"without references: {extra[:5]}")
  if not refs:
    raise ValueError("no captions to score: refs and preds are empty")
  for key in refs:
    if not isinstance(preds[key], str):
      raise TypeError(f"preds[{key!r}] must be one string, got {type(preds[key]).__name__}")
    if isinstance(refs[key], str) or not refs[key]:
      raise ValueError(f"refs[{key!r}] must be a non-empty list of strings, got {refs[key]!r}")


def _ngram_counts(words: list[str], max_n: int) -> Counter:
  return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def bleu(refs: dict, preds: dict) -> list[float]:
  """Corpus BLEU-1..4 as pycocoevalcap's `Bleu().compute_score` returns it (whitespace-tokenized text).

  Clipped n-gram matches and guesses are summed over the corpus; the brevity penalty uses, per caption, the
  reference length closest to the candidate's (the shorter on a tie). refs: `{id: [str, ...]}`, preds:
  `{id: str}`. Returns `[bleu1, bleu2, bleu3, bleu4]`.
  """
  _check_captions(refs, preds)
  max_n, tiny, small = 4, 1e-15, 1e-9  # pycocoevalcap's constants: tiny keeps 0/0 at 0, small avoids /0
  correct, guess = [0] * max_n, [0] * max_n
  total_test_length = total_ref_length = 0
  for key, pred in preds.items():
    words = pred.split()
    max_ref_counts: dict = {}
    ref_lengths = []
    for ref in refs[key]:
      ref_words = ref.split()
      ref_lengths.append(len(ref_words))
      for ngram, count in _ngram_counts(ref_words, max_n).items():
        max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
    for ngram, count in _ngram_counts(words, max_n).items():
      correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
    for n in range(max_n):
      guess[n] += max(0, len(words) - n)
    total_test_length += len(words)
    total_ref_length += min((abs(length - len(words)), length) for length in ref_lengths)[1]
  scores, product = [], 1.0
  for n in range(max_n):
    product *= float(correct[n] + tiny) / (guess[n] + small)
    scores.append(product ** (1.0 / (n + 1)))
  ratio = (total_test_length + tiny) / (total_ref_length + small)
  if ratio < 1:
    scores = [score * math.exp(1 - 1 / ratio) for score in scores]
  return scores


def cider(refs: dict, preds: dict) -> float:
  """Corpus CIDEr-D as pycocoevalcap's `Cider().compute_score` returns it (whitespace-tokenized text).

  TF-IDF n-gram vectors (n = 1..4, document frequencies over the references of the corpus), candidate weights
  clipped by the reference's, cosine similarity times a Gaussian penalty on the length difference (sigma 6),
  averaged over n and references, times 10, then averaged over captions. refs: `{id: [str, ...]}`, preds:
  `{id: str}`.
  """
  _check_captions(refs, preds)
  max_n, sigma = 4, 6.0
  ref_words = {key: [ref.split() for ref in refs[key]] for key in refs}
  ref_counts = {key: [_ngram_counts(words, max_n) for words in ref_words[key]] for key in refs}
  document_frequency: Counter = Counter()
  for counts_per_ref in ref_counts.values():
    document_frequency.update(set().union(*counts_per_ref))
  log_num_images = np.log(float(len(refs)))

  def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
    vectors = [{} for _ in range(max_n)]
    for ngram, term_frequency in counts.items():
      idf = log_num_images - np.log(max(1.0, document_frequency[ngram]))
      vectors[len(ngram) - 1][ngram] = float(term_frequency) * idf
    return vectors, [math.sqrt(sum(weight * weight for weight in vector.values())) for vector in vectors]

  scores = []
  for key, pred in preds.items():
    words = pred.split()
    vectors, norms = tfidf(_ngram_counts(words, max_n))
    total = np.zeros(max_n)
    # pycocoevalcap measures lengths in bigrams; that differs from words only for an empty caption, whose
    # similarity is 0 whatever the penalty.
    for counts, ref in zip(ref_counts[key], ref_words[key]):
      ref_vectors, ref_norms = tfidf(counts)
      penalty = np.e ** (-(float(len(words) - len(ref)) ** 2) / (2 * sigma ** 2))
      for n in range(max_n):
        value = sum(min(weight, ref_vectors[n].get(ngram, 0.0)) * ref_vectors[n].get(ngram, 0.0)
              for ngram, weight in vectors[n].items())
        if norms[n] != 0 and ref_norms[n] != 0:
          value /= norms[n] * ref_norms[n]
        total[n] += value * penalty
    scores.append(np.mean(total) / len(ref_counts[key]) * 10.0)
  return float(np.mean(scores))
