"""Results against a baseline: every metric's change, and the regression gate of `vlmjax eval --baseline`.

    vlmjax eval --workdir runs/new --out runs/new/results.json --baseline runs/old/results.json --max_drop 0.01
    # exits 1, naming each metric that fell by more than 0.01 (or is gone), when any did

Results are `{benchmark: {metric: value}}` as results.json holds them. A drop is measured in the metric's own units
(0.01 is one point of accuracy or F1, a hundredth of CIDEr-D); for the metrics where lower is better it is a rise.
`yes_ratio` (POPE's share of "yes" answers) has no better direction and is never gated.
"""

import math

LOWER_IS_BETTER = ("unplaced",)  # answers no rule could place (multiple choice)
NOT_GATED = ("yes_ratio",)


def _name(metric: str) -> str:
  """The metric's own name, without its split or group prefix: 'random/f1' -> 'f1'."""
  return metric.rpartition("/")[2]


def deltas(results: dict, baseline: dict) -> list[tuple[str, str, float | None, float | None]]:
  """(benchmark, metric, baseline value or None, new value or None) for every metric of either, in the order of
  the baseline's benchmarks and then the new ones."""
  rows = []
  for benchmark in dict.fromkeys([*baseline, *results]):
    old, new = baseline.get(benchmark, {}), results.get(benchmark, {})
    for metric in dict.fromkeys([*old, *new]):
      rows.append((benchmark, metric, old.get(metric), new.get(metric)))
  return rows


def regressions(results: dict, baseline: dict, max_drop: float) -> list[str]:
  """One line per baseline metric that got worse by more than `max_drop`, or that the new results lack."""
  if not max_drop >= 0:
    raise ValueError(f"--max_drop must be 0 or more, got {max_drop}")
  found = []
  for benchmark, metric, old, new in deltas(results, baseline):
    if old is None or _name(metric) in NOT_GATED:
      continue
    if new is None:
      found.append(f"{benchmark} {metric}: {old:.4f} in the baseline, missing now")
      continue
    worse = (new - old) if _name(metric) in LOWER_IS_BETTER else (old - new)
    if worse > max_drop or math.isnan(new):
      found.append(f"{benchmark} {metric}: {old:.4f} -> {new:.4f} ({new - old:+.4f}, more than {max_drop} worse)")
  return found
