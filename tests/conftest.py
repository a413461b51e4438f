"""Test set-up: 8 fake host devices for the sharding tests (must precede the first jax import)."""
import os

# Appended to any XLA_FLAGS already set, so that the 8-device sharding tests never skip silently.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
