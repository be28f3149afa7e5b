"""Evaluation speed: shapes_vqa questions answered by a trained run through `vlmjax.eval.harness` (batched greedy
generation with the inference code), per batch size.

    python tools/bench_eval.py --workdir runs/shapes [--questions 1000 --batch_sizes 16,64 --repeats 3]

For each batch size: one first pass (it compiles the prefill and decode programs of that batch), then --repeats
timed passes, each into an empty output folder so that no answer is read back from an earlier one. Prints one
table: the first pass's seconds, the median and min of the timed passes, questions/s at the median, and the
accuracy (the same in every pass of a batch size, decoding being greedy; the batch a prompt is padded into can
change an answer by rounding). The goal (evaluation issue): 1000 questions in under 60 s on the 2-core CPU. Prints
the host first (CPU model, cores, JAX devices) and the dtype the model computes in with the table.
"""

import statistics
import tempfile
import time

from absl import app, flags

import roofline  # tools/roofline.py: this script's own folder is on sys.path
import vlmjax
from vlmjax import runtime
from vlmjax import workdir as workdir_lib
from vlmjax.eval import harness

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (the main job's workdir).", required=True)
_QUESTIONS = flags.DEFINE_integer("questions", 1000, "shapes_vqa questions per pass (the first N).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "64"], "Rows per generation call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per batch size, after the first.")


def _timed_pass(vlm, data_dir: str, batch_size: int) -> tuple[float, float]:
  """(seconds, accuracy) of one evaluation of the first --questions questions into a fresh output folder."""
  with tempfile.TemporaryDirectory() as out_dir:
    start = time.perf_counter()
    results = harness.evaluate(vlm, ["shapes_vqa"], out_dir, data_dir, batch_size=batch_size,
                               limits={"shapes_vqa": _QUESTIONS.value})
    return time.perf_counter() - start, results["shapes_vqa"]["accuracy"]


def main(argv):
  del argv
  print(roofline.host_description())
  workdir = _WORKDIR.value
  data_dir = workdir_lib.data_dir(workdir)
  vlm = vlmjax.load(workdir)
  rows = []
  for batch_size in map(int, _BATCH_SIZES.value):
    first, accuracy = _timed_pass(vlm, data_dir, batch_size)
    seconds = [_timed_pass(vlm, data_dir, batch_size)[0] for _ in range(_REPEATS.value)]
    rows.append((batch_size, first, statistics.median(seconds), min(seconds), accuracy))
  print(f"\n{_QUESTIONS.value} shapes_vqa questions, {workdir}, vlmjax computing in "
        f"{roofline.compute_dtype(vlm.model_config)}")
  print(f"{'batch':>6}{'first pass s':>14}{'median s':>10}{'min s':>8}{'questions/s':>13}{'accuracy':>10}")
  for batch_size, first, median, fastest, accuracy in rows:
    print(f"{batch_size:>6}{first:>14.1f}{median:>10.1f}{fastest:>8.1f}{_QUESTIONS.value / median:>13.0f}"
          f"{accuracy:>10.3f}")


if __name__ == "__main__":
  runtime.exec_with_huge_pages()  # as `vlmjax` runs: XLA's CPU buffers in huge pages
  app.run(main)
