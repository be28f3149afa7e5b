"""Every benchmark by name: the built-in shapes benchmarks (`benchmarks.py`), CLIP retrieval (`retrieval.py`) and
file benchmarks named by a spec `[NAME=]KIND:PATH:...` (`file_benchmarks.py`)."""

from vlmjax.eval import benchmarks, file_benchmarks, retrieval


def get(name: str) -> benchmarks.Benchmark | retrieval.RetrievalBenchmark:
  """A built-in benchmark by name, or a file benchmark from its spec `[NAME=]KIND:PATH:...` (file_benchmarks.py)."""
  if name in benchmarks.BENCHMARKS:
    return benchmarks.BENCHMARKS[name]
  if name in retrieval.BENCHMARKS:
    return retrieval.BENCHMARKS[name]
  if ":" in name:
    return file_benchmarks.parse(name)
  available = ", ".join([*benchmarks.BENCHMARKS, *retrieval.BENCHMARKS])
  raise ValueError(f"unknown benchmark {name!r}; available: {available}, "
                   f"or files as KIND:PATH:... with KIND one of {', '.join(file_benchmarks.KINDS)} "
                   f"(see `vlmjax eval --help`)")
