"""The parity suite: pytest plugin, report and helpers."""
