"""The synthetic parity project that the plugin tests build with pytester.

Its conftest switches the suite on (fvkit has no pytest entry point) and binds a
small synthetic dataset, so gate modules written by a test report without any
model or snapshot.
"""

from fvkit.models import zoo

#: The zoo cache as seen before pytester points HOME at a temporary directory.
REAL_CACHE = zoo.cache_root()
SYNTH_DIR = "results_fv/synthds/fixed_trials_synthds_t2_s2_seed0"
SYNTH_CONFTEST = '''
import pytest
from fvkit.parity.plugin import report_state

pytest_plugins = ["fvkit.parity.switch"]

def pytest_configure(config):
    report_state(config).bind("synthds", "fixed_trials_synthds_t2_s2_seed0", {"origin": "synthetic"})
'''
