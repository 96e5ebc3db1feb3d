"""Reference numbers stored as syrupy snapshots, compared with the gates' tolerances.

    book = SnapshotBook(snapshot, "M2", key="fixed_trials_antonym_t10_s10_seed0-mt1-nh5-el1")
    if book.exists():
        failures = book.verdict(fvkit_part)      # syrupy's own assertion; [] or syrupy's diff lines
    book.write(reference_part, environment)      # only from a live reference run

One JSON file per gate, model (the test id) and settings key, e.g.
``parity_tests/__snapshots__/test_m2_mean_activations/test_mean_activations[tiny-llama][<key>].json``.
A snapshot holds the *reference's* numbers and the environment they came from
(transformers version, reference commit, normalizations). fvkit's own output is
never written: :class:`SnapshotBook` only ever asserts a reference payload when
updating, and fvkit's payload only against an existing snapshot.

The gate's verdict against a snapshot is syrupy's own assertion
(``snapshot(name=key) == {"value": part}``): the extension's ``matches``
applies the gate's tolerances, and a failure carries syrupy's diff, whose
lines (``diff_lines``) name the worst entry and the measured drift against the
tolerance. The per-stage rows of the report come from the same comparison
(:func:`fvkit.parity.compare.compare_gate`), run by the gate runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from syrupy.extensions.json import JSONSnapshotExtension

from fvkit.errors import SnapshotError
from fvkit.parity.compare import compare_gate

FORMAT = "fvkit-parity-snapshot/1"


def settings_key(trials_id: str, n_trials_used: int, n_top_heads: int, edit_layer: int) -> str:
    """Everything besides the model that determines a gate's reference numbers."""
    return f"{trials_id}-mt{n_trials_used}-nh{n_top_heads}-el{edit_layer}"


class ParitySnapshotExtension(JSONSnapshotExtension):
    """A JSON snapshot whose floats match within the gate's tolerance.

        class M2Snapshot(ParitySnapshotExtension):
            gate = "M2"
        assert snapshot(extension_class=M2Snapshot, name=key) == {"value": part}

    Two reference payloads (both carry ``environment``) must match exactly, so an
    update rewrites a snapshot whenever anything about the reference changed;
    fvkit's payload is compared with :func:`fvkit.parity.compare.compare_gate`.
    """

    gate: str = ""

    def serialize(self, data, *, exclude=None, include=None, matcher=None) -> str:
        # Plain floats, one line per top-level key: the files stay diffable without
        # one line per tensor entry.
        body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':'), ensure_ascii=False)}"
                          for k, v in data.items())
        return "{\n" + body + "\n}\n"

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        try:
            asserted, stored = json.loads(serialized_data), json.loads(snapshot_data)
        except (TypeError, ValueError):
            return False
        if "environment" in asserted:
            return asserted == stored
        return self.comparison(asserted, stored).ok

    def comparison(self, asserted: dict, stored: dict):
        """fvkit's asserted part against the stored reference part, with the gate's tolerances
        (the tokenizer's BOS ids, asserted alongside, only name a token mismatch's cause)."""
        return compare_gate(self.gate, asserted.get("value", {}), stored.get("value", {}), "snapshot",
                            tuple(asserted.get("bos_ids") or ()))

    def diff_lines(self, serialized_data, snapshot_data):
        """What syrupy shows under a failed assertion: every failing stage with its measured
        drift, tolerance and worst entry (fvkit's value and the reference's there)."""
        try:
            asserted, stored = json.loads(serialized_data), json.loads(snapshot_data)
        except (TypeError, ValueError):
            yield "snapshot is missing or not valid JSON"
            return
        if "environment" in asserted:
            yield "the reference's payload differs from the stored one (numbers or environment)"
            return
        yield from self.comparison(asserted, stored).failures() or ["snapshot differs (metadata only)"]


_EXTENSIONS: dict = {}


def extension_for(gate: str) -> type:
    """The snapshot extension class of one gate (one class per gate, created once)."""
    if gate not in _EXTENSIONS:
        _EXTENSIONS[gate] = type(f"{gate}ParitySnapshot", (ParitySnapshotExtension,), {"gate": gate})
    return _EXTENSIONS[gate]


class SnapshotBook:
    """One gate's snapshot for one model and settings key.

        book = SnapshotBook(snapshot, "M3", key)
        book.path, book.exists(), book.load()["environment"]
    """

    def __init__(self, snapshot, gate: str, key: str):
        self.gate = gate
        self.key = key
        self.assertion = snapshot.use_extension(extension_for(gate))

    @property
    def path(self) -> Path:
        ext = self.assertion.extension
        return Path(ext.get_location(test_location=self.assertion.test_location, index=self.key))

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> Optional[dict]:
        """The stored snapshot; None when there is none. A file that is there but cannot be
        read raises SnapshotError naming it: stored reference numbers that cannot be used
        are an error of the suite, never a reason to skip the gate."""
        if not self.exists():
            return None
        fix = ("restore it with `git checkout -- <file>` or regenerate it from a live reference run "
               "(--reference-src ... --snapshot-update)")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise SnapshotError(f"snapshot {self.path} cannot be read ({err}); {fix}") from None
        except ValueError as err:
            raise SnapshotError(f"snapshot {self.path} is not valid JSON ({err}); {fix}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise SnapshotError(f"snapshot {self.path} is not a fvkit parity snapshot (format {found!r}, "
                                f"expected {FORMAT!r}); {fix}")
        return data

    def verdict(self, part: dict, bos_ids=()) -> list:
        """syrupy's assertion of fvkit's part against the stored reference part: [] when it
        holds, else the failed assertion's header and syrupy's diff (``get_assert_diff``, what
        pytest shows under ``assert snapshot == value``). Never writes: callers only get here
        when not updating snapshots."""
        assertion = self.assertion(name=self.key)
        if assertion == {"value": part, "bos_ids": list(bos_ids)}:
            return []
        return [f"syrupy: snapshot {self.path.name} == fvkit's {self.gate} numbers failed:"] + [
            "  " + line for line in assertion.get_assert_diff()]

    def write(self, part: dict, environment: dict, model: str, settings: dict) -> bool:
        """Assert the reference's part; syrupy writes it under ``--snapshot-update``."""
        payload = {"format": FORMAT, "gate": self.gate, "model": model, "key": self.key,
                   "settings": settings, "environment": environment, "value": part}
        return self.assertion(name=self.key) == payload
