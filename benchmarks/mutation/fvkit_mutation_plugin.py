"""pytest plugin that applies the fault named by FVKIT_MUTATION before the gates are imported.

    FVKIT_MUTATION=top_heads_ascending python -m pytest parity_tests -p fvkit_mutation_plugin ...

Loaded with ``-p``, it is imported before any conftest, so the parity gates'
modules import the faulty functions. Without FVKIT_MUTATION (the control run)
it changes nothing.
"""

import os

from faults import apply

ENV = "FVKIT_MUTATION"

_name = os.environ.get(ENV, "").strip()
_fault = apply(_name) if _name else None


def pytest_report_header(config):
    return f"fvkit mutation: {_fault.name} ({_fault.what})" if _fault else "fvkit mutation: none (control)"
