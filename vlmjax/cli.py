"""The `vlmjax` command: summarize, data, train, eval, generate, serve.

    vlmjax summarize --config configs/shapes_tiny.py --config.mesh.tensor=2 --devices 8

Each subcommand takes absl flags; `--config FILE` with `--config.a.b=value` overrides (ml_collections).
"""

import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "summarize: plan the mesh for this many devices "
                                "(default: the devices JAX sees).")


def summarize(args: list[str]) -> None:
  """Parameters per module and total, and each parameter's sharding under the config's mesh."""
  del args
  import jax

  from vlmjax.models.summary import summarize as summary

  if _CONFIG.value is None:
    raise SystemExit("vlmjax summarize: --config FILE is required")
  print(summary(_CONFIG.value, _DEVICES.value or jax.device_count()))


COMMANDS = {"summarize": summarize}


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"usage: vlmjax {{{','.join(COMMANDS)}}} [flags]   (vlmjax COMMAND --help for its flags)")
  command = argv.pop(1)
  # config_flags registers the `--config.a.b` override flags from sys.argv, so it must hold what we parse.
  sys.argv = argv
  try:
    positional = FLAGS(argv)
  except flags.Error as error:
    raise SystemExit(f"vlmjax {command}: {error}") from error
  try:
    COMMANDS[command](positional[1:])
  except ValueError as error:  # a config or an argument that cannot work: the message says what to change
    raise SystemExit(f"vlmjax {command}: {error}") from error


if __name__ == "__main__":
  main()
