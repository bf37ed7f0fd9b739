"""The one exception the evaluation harness raises for problems a user can fix.

The CLI turns it into a one-line message and exit code 2 instead of a traceback, so a refused
run (an attacker that shares identities with the shadow, a recogniser whose E is not the
bundle's) reads as a configuration problem rather than a crash.
"""

from __future__ import annotations


class EvaluationError(ValueError):
    """The inputs of an evaluation are inconsistent; the message says which and how to fix it."""
