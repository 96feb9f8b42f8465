"""Test settings: eight fake CPU devices, quiet TensorFlow, the test config."""

import os

# Before jax is imported anywhere: multi-device code runs on 8 CPU devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import runpy  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  """configs/<name>.py -> its get_config()."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  return runpy.run_path(path)["get_config"]()


@pytest.fixture
def test_config():
  return load_config("test")
