"""Names that become parts of file paths: arms, studies, sweep levels, schedule branches.

A study names things that the run folder stores under those names (``units/<arm>/``,
``weights/<arm>_p0000.npz``, ``runs/<study>-<hash>``). Every such name is checked here, where the
study is loaded, so no path is ever built from user text that could leave the run folder, name a
hidden or reserved file, or collide with another name on a case-insensitive file system.
:func:`inside` is the second guard: the store joins every path through it.

Examples
--------
>>> check_name("ssri_high-dose", "arm")
'ssri_high-dose'
>>> check_name("../../x", "arm")
Traceback (most recent call last):
...
ValueError: arm name '../../x' is not allowed: use 1-64 letters, digits, '_' or '-', starting with a letter or digit
>>> check_distinct(["ssri", "SSRI"], "arm")
Traceback (most recent call last):
...
ValueError: arm names 'ssri' and 'SSRI' differ only in case (they would share files on some systems)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MAX_NAME_LENGTH", "RESERVED", "check_distinct", "check_name", "inside"]

#: Longest accepted name: short enough for any file system once prefixes and suffixes are added.
MAX_NAME_LENGTH = 64

_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_NAME_LENGTH - 1}}}")

#: Names a file system treats specially (Windows device names, with any case).
RESERVED = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
)


def check_name(name: object, what: str) -> str:
    """Return ``name`` if it is safe as one path component, else raise ``ValueError``.

    Safe means 1-64 characters from letters, digits, ``_`` and ``-``, starting with a letter or
    digit (so no ``..``, no separators, no hidden files, no absolute paths), and not a device name.

    Parameters
    ----------
    name
        The user's text.
    what
        What it names, for the message (``"arm"``, ``"study"``, ...).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a string, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ValueError(
            f"{what} name {shown!r} is not allowed: use 1-{MAX_NAME_LENGTH} letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    if name.lower() in RESERVED:
        raise ValueError(f"{what} name {name!r} is reserved by some file systems")
    return name


def check_distinct(names: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` if two names are equal when case is ignored."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ValueError(
                f"{what} names {other!r} and {name!r} differ only in case (they would share files on some systems)"
            )


def inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refusing any result that does not stay inside ``root``.

    Raises
    ------
    ValueError
        A part is absolute or climbs out of ``root`` (``..``, or a symbolic link inside ``root``
        pointing elsewhere).

    Examples
    --------
    >>> inside(Path("run"), "units", "ssri").as_posix()
    'run/units/ssri'
    >>> inside(Path("run"), "..", "x")
    Traceback (most recent call last):
    ...
    ValueError: path '../x' leaves the run folder run
    """
    path = root.joinpath(*parts)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise ValueError(f"path {Path(*parts).as_posix()!r} leaves the run folder {root}")
    return path
