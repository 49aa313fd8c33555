"""Test session set-up shared by every test module.

Eight simulated CPU devices let the data-parallel code paths run here exactly as they
run on an 8-GPU host; the flag must be set before JAX is first imported.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
