"""Running `vlmjax train` as users do, in a fresh process, on the test session's tiny shapes data set: the
helpers of test_trainer.py and test_trainer_sharded.py."""

import json
import os
import subprocess
import sys

STEPS = ["--config.train.log_every=1", "--config.train.batch_size=8", "--config.data.length=96",
         "--config.optim.warmup_steps=2"]
# One layer per tower: what these tests check does not depend on depth, and each run compiles in half the time.
ONE_LAYER = {"model.vision.depth": 1, "model.decoder.depth": 1, "contrastive.text.depth": 1}


def command(workdir, data_flags, *flags, cpu_devices=0):
  """The run's command line; its devices are XLA_FLAGS' (`env`) unless cpu_devices splits the CPU."""
  return [sys.executable, "-m", "vlmjax.cli", "train", "--config", "configs/shapes_tiny.py", "--workdir",
          str(workdir), *data_flags, *STEPS, *(f"--config.{key}={value}" for key, value in ONE_LAYER.items()),
          f"--config.cpu_devices={cpu_devices}", *flags]


def env(devices=1, **extra):
  """The test session's environment (its compilation cache and XLA options, tests/conftest.py) with `devices`
  CPU devices."""
  flags = [flag for flag in os.environ["XLA_FLAGS"].split() if "device_count" not in flag]
  return dict(os.environ, XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
              JAX_PLATFORMS="cpu", **extra)


def losses(workdir) -> dict[int, float]:
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row["loss"]  # a resumed run re-logs steps: the last row wins
  return rows


def train(workdir, data_flags, *flags, devices=1, cpu_devices=0):
  """Runs to the end (asserting it succeeds); returns {step: loss}."""
  result = subprocess.run(command(workdir, data_flags, *flags, cpu_devices=cpu_devices), env=env(devices),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return losses(workdir)


def generate(workdir, data_dir, tmp_path, max_new_tokens: int) -> subprocess.CompletedProcess:
  """`vlmjax generate` on the workdir, asked about the first validation image (written to tmp_path)."""
  from PIL import Image

  from vlmjax.data import shapes
  image = os.path.join(tmp_path, "image.png")
  Image.fromarray(shapes.load(data_dir, "validation")[0]["image"]).save(image)
  return subprocess.run([sys.executable, "-m", "vlmjax.cli", "generate", "--checkpoint", str(workdir), "--image",
                         image, "--prompt", "What colour is the circle?", "--max_new_tokens", str(max_new_tokens)],
                        env=env(), capture_output=True, text=True, timeout=300)
