"""The one base class of every expected failure, so the command line has one error path.

An *expected* failure is one the user can fix from its message alone: a bad study file, a foreign
or locked run folder, a damaged unit file, training that diverged, a missing optional dependency.
Each module raises its own subclass (also a subclass of the built-in it refines, e.g.
:class:`~virtualpatient.protocol.ProtocolError` is a ``ValueError``), and the command line prints
any :class:`VirtualPatientError` as one line with exit status 2. Anything else is a bug: one line
plus the path of a log file holding the traceback.

This module imports nothing, so the command line can catch these errors even while the rest of
the package is still being imported.
"""

from __future__ import annotations

__all__ = ["UsageError", "VirtualPatientError"]


class VirtualPatientError(Exception):
    """An expected failure whose message, one line, names the file, field or flag at fault."""


class UsageError(VirtualPatientError, ValueError):
    """A command-line value or environment setting is invalid, or a run was refused before it started."""
