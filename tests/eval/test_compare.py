"""Results against a baseline: the regression gate's verdicts and the changes the report shows."""

import pytest

from vlmjax.eval import compare

BASELINE = {"shapes_vqa": {"accuracy": 0.90, "accuracy/colour": 0.80},
            "shapes_pope": {"f1": 0.70, "yes_ratio": 0.50, "random/f1": 0.72},
            "mmbench": {"accuracy": 0.60, "unplaced": 3}}


def test_nothing_falls_against_itself_or_a_worse_baseline():
  assert compare.regressions(BASELINE, BASELINE, 0.0) == []
  better = {"shapes_vqa": {"accuracy": 0.95, "accuracy/colour": 0.80},
            "shapes_pope": {"f1": 0.70, "yes_ratio": 0.90, "random/f1": 0.80},  # yes_ratio is not gated
            "mmbench": {"accuracy": 0.60, "unplaced": 1}, "new_benchmark": {"accuracy": 0.1}}
  assert compare.regressions(better, BASELINE, 0.0) == []


def test_every_metric_that_fell_by_more_than_allowed_is_named():
  worse = {"shapes_vqa": {"accuracy": 0.885, "accuracy/colour": 0.70},  # -0.015 and -0.10
           "shapes_pope": {"f1": 0.695, "yes_ratio": 0.5},  # -0.005: within 0.01; random/f1 is gone
           "mmbench": {"accuracy": 0.60, "unplaced": 5}}  # unplaced answers rose by 2: lower is better
  fallen = compare.regressions(worse, BASELINE, 0.01)
  assert [line.split(":")[0] for line in fallen] == ["shapes_vqa accuracy", "shapes_vqa accuracy/colour",
                                                     "shapes_pope random/f1", "mmbench unplaced"]
  assert "0.9000 -> 0.8850 (-0.0150" in fallen[0] and "missing now" in fallen[2]
  assert len(compare.regressions(worse, BASELINE, 0.02)) == 3  # -0.015 is within 0.02


def test_a_negative_allowance_is_refused():
  with pytest.raises(ValueError, match="--max_drop must be 0 or more"):
    compare.regressions(BASELINE, BASELINE, -0.1)


def test_deltas_pair_each_metric_of_either_side():
  results = {"shapes_vqa": {"accuracy": 0.95}, "extra": {"r@1": 0.5}}
  rows = compare.deltas(results, {"shapes_vqa": BASELINE["shapes_vqa"]})
  assert rows == [("shapes_vqa", "accuracy", 0.90, 0.95), ("shapes_vqa", "accuracy/colour", 0.80, None),
                  ("extra", "r@1", None, 0.5)]
