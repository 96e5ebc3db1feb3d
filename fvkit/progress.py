"""Progress bars for long stages, quiet when asked (tests, reference comparisons).

    for t in progress(range(n), desc="indirect effect"):
        ...
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable, desc: str, enabled: bool = True, total=None):
    """tqdm on stderr; FVKIT_PROGRESS=0 turns every bar off."""
    if not enabled or os.environ.get("FVKIT_PROGRESS", "1") == "0":
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
