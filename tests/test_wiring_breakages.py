"""Every deliberate wiring bug of tests/wiring_breakages.py makes its tests fail (issue 19)."""

import pytest

from wiring_breakages import BREAKAGES, run_breakages

pytestmark = pytest.mark.slow  # one pytest process per breakage (about a minute): the slow stage


def test_every_breakage_is_caught():
    outcomes = run_breakages(BREAKAGES, log=lambda line: None)
    assert [o.breakage.name for o in outcomes] == [b.name for b in BREAKAGES]
    missed = {o.breakage.name: o.tail for o in outcomes if not o.caught}
    assert not missed, f"breakages the suite did not catch: {list(missed)}\n" + "\n".join(missed.values())
