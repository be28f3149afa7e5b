"""Every benchmark by name: the built-in shapes benchmarks (`benchmarks.py`), CLIP retrieval (`retrieval.py`) and
file benchmarks named by a spec `[NAME=]KIND:ARG:ARG...`, whose kinds the adapter modules define (`KINDS` of
`file_benchmarks.py`, ...)."""

import os

from vlmjax.eval import (benchmarks, document_benchmarks, exam_benchmarks, field_benchmarks, file_benchmarks, mmbench,
                         retrieval)

KINDS: dict[str, benchmarks.FileKind] = {**file_benchmarks.KINDS, **mmbench.KINDS, **field_benchmarks.KINDS,
                                          **exam_benchmarks.KINDS, **document_benchmarks.KINDS}


def get(name: str, split: str = benchmarks.SPLITS[0]) -> benchmarks.Benchmark | retrieval.RetrievalBenchmark:
  """A built-in benchmark by name over the shapes data set's `split`, or a file benchmark from its spec
  `[NAME=]KIND:PATH:...` (file_benchmarks.py)."""
  if name in benchmarks.NAMES:
    return benchmarks.shapes_benchmarks(split)[name]
  if name in retrieval.BENCHMARKS:
    return retrieval.BENCHMARKS[name]
  if ":" in name:
    return parse(name)
  available = ", ".join([*benchmarks.NAMES, *retrieval.BENCHMARKS])
  raise ValueError(f"unknown benchmark {name!r}; available: {available}, "
                   f"or files as KIND:PATH:... with KIND one of {', '.join(KINDS)} "
                   f"(see `vlmjax eval --help`)")


def parse(spec: str) -> benchmarks.Benchmark:
  """The benchmark a spec `[NAME=]KIND:ARG:ARG...` names; its paths must exist."""
  head, _, rest = spec.partition(":")
  name, _, kind_name = head.rpartition("=")
  if kind_name not in KINDS:
    raise ValueError(f"benchmark {spec!r}: unknown file kind {kind_name!r}; kinds: "
                     + "; ".join(f"{kind}:{k.usage}" for kind, k in KINDS.items()))
  kind = KINDS[kind_name]
  args = rest.split(":", kind.max_args - 1) if kind.max_args else rest.split(":")
  if not kind.min_args <= len(args) <= (kind.max_args or len(args)) or not all(args):
    raise ValueError(f"benchmark {spec!r}: expected {kind_name}:{kind.usage}")
  for path in args[:kind.path_args]:
    if not os.path.exists(path):
      raise FileNotFoundError(f"benchmark {spec!r}: {path} does not exist")
  return kind.build(name or kind_name, args)
