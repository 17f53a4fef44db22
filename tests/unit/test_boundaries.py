"""The import boundaries that keep `sft-launch --help` instant and the worker free of Ray."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, banned", [
    ("launcher.cli", "deepspeed"), ("launcher.cli", "torch"), ("launcher.cli", "ray"),
    ("launcher.config", "torch"), ("launcher.controller", "deepspeed"), ("launcher.ray_job", "deepspeed"),
    ("trainer.loop", "ray"), ("trainer.freezing", "torch"), ("trainer.splits", "torch"),
    ("trainer.ds_config", "deepspeed")])
def test_import_boundary(module, banned):
    probe = f"import sys, {module}; sys.exit({banned!r} in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0, f"{module} imports {banned}"
