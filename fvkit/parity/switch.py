"""Switches the parity suite on for the one pytest project that asks for it.

    # conftest.py at the project's root (fvkit's own checkout has this one)
    pytest_plugins = ["fvkit.parity.switch"]

    pytest -p fvkit.parity.switch ...   # the same for a single run

fvkit installs no pytest entry point: an environment with fvkit installed runs
every other project's pytest unchanged (no ``--model``, ``--device``, ``--seed``
or ``--dataset`` of ours to clash with theirs, no refusal of
``--snapshot-update``). Registering goes through this module rather than naming
:mod:`fvkit.parity.plugin` directly so that it happens once even where the
plugin is already registered under its old entry-point name (an environment
installed from an older fvkit); pytest would refuse a second registration.
"""

from __future__ import annotations

#: The name the plugin is registered under (the old entry point's, so ``-p no:fvkit_parity`` still works).
PLUGIN_NAME = "fvkit_parity"


def enable(pluginmanager) -> None:
    """Register the parity plugin unless it already is, or ``-p no:fvkit_parity`` blocks it."""
    from fvkit.parity import plugin

    if pluginmanager.is_registered(plugin) or pluginmanager.is_blocked(PLUGIN_NAME):
        return
    pluginmanager.register(plugin, PLUGIN_NAME)


def pytest_addhooks(pluginmanager) -> None:
    # Called as soon as this module is registered, before options are parsed, so
    # the plugin's pytest_addoption still runs.
    enable(pluginmanager)
