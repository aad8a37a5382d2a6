"""How long the hypothesis targets run: a few thousand examples under the
tests (CI), a hundred times more for ``python -m tests.fuzz --long``
(``OVL_FUZZ_SCALE``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("OVL_FUZZ_SCALE", "1"))


def examples(n: int) -> settings:
    """``n`` examples (times the scale), no deadline: machines are shared and slow."""
    return settings(max_examples=n * SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
