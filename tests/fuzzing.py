"""How hard the hypothesis tests search.

By default (CI included) each fuzz test runs a fixed, derandomized set of examples, so a run's result
depends only on the code under test: a change cannot fail CI because the fuzzer happened to draw a
new input that breaks code the change never touched. To search, draw fresh random examples::

    HOTSWAP_FUZZ=explore python -m pytest tests/unit/test_fuzz_adapters.py
    HOTSWAP_FUZZ=explore:10 python -m pytest tests/integration/test_load.py -k fuzzed   # 10x the examples

Every input such a search finds is pinned: as a corpus case (``tests/corpus.py``) or an ``@example``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_ENV = "HOTSWAP_FUZZ"


def _mode() -> tuple[bool, int]:
    raw = os.environ.get(_ENV, "").strip()
    if not raw or raw == "fixed":
        return False, 1
    name, _, factor = raw.partition(":")
    if name != "explore" or (factor and not (factor.isdigit() and int(factor) >= 1)):
        raise ValueError(f"{_ENV}={raw!r}: use 'fixed' (the default), 'explore' or 'explore:N' with N >= 1")
    return True, int(factor or 1)


EXPLORE, FACTOR = _mode()


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings for a fuzz test that tries ``max_examples`` inputs (times N when exploring)."""
    return settings(
        max_examples=max_examples * FACTOR,
        derandomize=not EXPLORE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
