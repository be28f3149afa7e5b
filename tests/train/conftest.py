import pytest


@pytest.fixture(scope="session")
def data_flags(tiny_shapes_dir, tiny_shapes_splits):
  """The flags that point a `vlmjax train` run at the session's tiny shapes data set (built with these splits)."""
  return [f"--config.data.dir={tiny_shapes_dir}"] + [f"--config.data.shapes.splits.{split}={size}"
                                                     for split, size in tiny_shapes_splits.items()]
