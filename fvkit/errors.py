"""One exception type for every user-facing failure.

A researcher who passes a wrong model name, spec, layer or file should read one
sentence naming the thing that is wrong and how to fix it, not a traceback. The
CLI and the pytest plugin catch :class:`FvkitError` and print ``str(err)``.
"""


class FvkitError(Exception):
    """A failure caused by input the user can fix; the message says how."""


class SpecError(FvkitError):
    """A ModelSpec is malformed or does not fit the model it is applied to."""


class DataError(FvkitError):
    """A dataset or fixed-trials file is missing, malformed or mismatched."""


class ParityModeError(FvkitError):
    """A setting that parity work does not allow (device, dtype, quantization)."""


class SnapshotError(FvkitError):
    """A stored parity snapshot that cannot be read: unreadable, not JSON, or not a fvkit parity snapshot."""


class UnsupportedReleaseError(FvkitError):
    """The installed transformers release cannot build this model (too old for its architecture).

    Not a broken set-up but a property of the environment: the parity suite skips
    such a model's gates with this message instead of failing them.
    """


class DataWarning(UserWarning):
    """Data that is usable but probably not what was meant (duplicate rows, for one)."""


class InjectionWarning(DataWarning):
    """An injected vector too small against the residual stream to change any prediction."""
