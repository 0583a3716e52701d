"""Hypothesis profiles of the bayes_ext property tests (tests/test_properties.py).

Selected with HYPOTHESIS_PROFILE (default "ci"); PROFILE is applied to each property test as a
decorator, so importing this module changes nothing for other tests.

- ``ci``: reproducible (derandomize: the same examples on every run, no example database),
  ``CI_EXAMPLES`` per property test; the property tests together run >= 500 examples.
- ``long``: by hand, ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``:
  random (not derandomized) and 20x the examples.
- ``sanitize``: a few examples per test, for the ASan/UBSan run (tools/sanitize.sh).
"""
import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 150
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)

settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=20 * CI_EXAMPLES, derandomize=False, **_COMMON)
settings.register_profile("sanitize", max_examples=25, derandomize=True, database=None, **_COMMON)

PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
