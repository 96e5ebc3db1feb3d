"""The mutation harness's fault table (benchmarks/mutation/) still fits fvkit's code.

Every fault replaces one fvkit function by name; a rename in fvkit would make
the harness fail at startup of each run. Installing the faults changes the
process that does it, so they are installed in a child process of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MUTATION = Path(__file__).resolve().parents[1] / "benchmarks" / "mutation"

INSTALL_ALL = """
import faults
assert len(faults.FAULTS) >= 12, len(faults.FAULTS)
for name in faults.FAULTS:
    faults.apply(name)
try:
    faults.apply("no_such_fault")
except faults.MutationError as err:
    assert "no_such_fault" in str(err) and "slot_off_by_one" in str(err)
else:
    raise AssertionError("an unknown fault name was accepted")
print("ok")
"""


def test_every_fault_installs_on_current_fvkit():
    root = MUTATION.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(MUTATION)]))
    env.pop("FVKIT_MUTATION", None)
    proc = subprocess.run([sys.executable, "-c", INSTALL_ALL], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
