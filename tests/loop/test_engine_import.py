"""A worker imports DeepSpeed without MLflow (tests/ installs MLflow, as a user's tracker extra does)."""
import subprocess
import sys

from tests.helpers import REPO

PROBE = """
import sys
from trainer.engine import import_deepspeed
ds = import_deepspeed()
print("PROBE", "mlflow" in sys.modules, ds.init_distributed is not None)
import mlflow  # the process can still import it
print("PROBE", "mlflow" in sys.modules)
"""


def test_a_fresh_process_imports_deepspeed_without_importing_mlflow_and_can_import_it_after():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probes = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert probes == [["False", "True"], ["True"]], proc.stdout[-2000:]
