"""The engine's input type, re-exported where the engine looks for it.

``VMUsage`` lives in ``vacfactory.core.apel`` because rendering a record from it is pure;
the engine imports it from here (or from ``vacfactory.accounting``).
"""

from __future__ import annotations

from vacfactory.core.apel import RecordIdentity, VMUsage

__all__ = ["RecordIdentity", "VMUsage"]
