"""Hypothesis profiles for the property-based tests of the readers of user files.

``ci`` (the default): 50 examples a test, no per-example deadline (a loaded CI machine), no
example database written into the checkout; the whole folder runs in well under a minute.
``thorough``: 2000 examples a test, for a local hunt (``HYPOTHESIS_PROFILE=thorough pytest
tests/properties``). A failure prints the seed (``@reproduce_failure`` blob) to replay it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=50, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
