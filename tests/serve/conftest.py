"""Running an app of `create_app` in this process, on uvicorn on a free loopback port."""

import contextlib
import socket
import threading
import time

import pytest
import uvicorn


@pytest.fixture(scope="session")
def serve_app():
  """`serve_app(app)`: a context manager that serves the app in a thread, yielding its port."""
  return _running


@contextlib.contextmanager
def _running(app):
  """Serves `app` in a thread while the block runs; yields the port. The app's engine stops with it."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  runner = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 300  # a warm-up compiles first
  while not runner.started:
    assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
    time.sleep(0.05)
  try:
    yield sock.getsockname()[1]
  finally:
    runner.should_exit = True
    thread.join(30)
