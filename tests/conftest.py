"""Settings for the whole suite.

Hypothesis' per-example deadline (200 ms by default) is a timing check that a busy machine
fails at random (`make test-loaded`): it is off; tests that care about speed say so themselves,
and performance goals live in tests/bench/.
"""

from hypothesis import settings

settings.register_profile("vacfactory", deadline=None)
settings.load_profile("vacfactory")
