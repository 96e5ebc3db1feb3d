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


BOS_NEVER_WRITTEN = """
import faults
faults.apply("bos_text_dropped")
from fvkit.models.loader import load_model
from fvkit.method.stage_inputs import bos_text_for
from fvkit.parity.spec_smoke import SmokeFailure, bos_policy_smoke
lm = load_model("tiny-llama")
assert lm.spec.prepend_bos and lm.tokenizer.bos_token_id is not None
ids = lm.tokenizer("hot").input_ids
assert lm.tokenizer.bos_token_id not in ids, ids
try:
    bos_policy_smoke(lm)
except SmokeFailure:
    pass
else:
    raise AssertionError("M5's BOS policy check passed a tokenizer that adds no BOS")
gpt2 = load_model("tiny-gpt2")
assert gpt2.spec.bos_text and bos_text_for(gpt2.spec) is None
print("ok")
"""


def test_bos_text_dropped_is_a_fault_on_prepend_bos_and_bos_text_specs_alike():
    """On a prepend_bos spec (Llama) the fault takes the tokenizer's BOS away; on a bos_text spec
    (GPT-2) it drops the BOS text. Either way the prompt the model sees has no BOS."""
    root = MUTATION.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(MUTATION)]))
    env.pop("FVKIT_MUTATION", None)
    proc = subprocess.run([sys.executable, "-c", BOS_NEVER_WRITTEN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
