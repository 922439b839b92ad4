"""Test session setup: JAX on the CPU with 8 forced host devices, so (2, 2, 2) meshes can be tested."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
