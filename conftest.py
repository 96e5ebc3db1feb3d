"""Switches the parity suite (fvkit.parity.plugin) on for this project's pytest runs.

The plugin is not an installed entry point, so it acts only where a project asks
for it; here it gives the unit tests in tests/ and the gates in parity_tests/ the
``--model``, ``--dataset``, ... options (see ``pytest --help``).
"""

pytest_plugins = ["fvkit.parity.switch"]
