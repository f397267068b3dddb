"""Property: no study file, however malformed or extreme, gets a traceback or writes outside its folder.

Hypothesis builds study files from the protocol's own schema: it walks the fields of
:class:`~virtualpatient.protocol.Protocol` and of every registered treatment, reads each field's type
and bounds, and sets one to three of them, on top of a tiny valid study, to values drawn at and
beyond those bounds, NaN, infinities, wrong types and hostile names. Each file runs through the real
command in a sandbox folder. It must end in either exit 2 with exactly one error line, or a
finished tiny run (exit 0) with a ``results.csv``; never a traceback, never exit 1, and never a
file anywhere but the run folder.

Integer fields are drawn near their lower bound or beyond their upper one, not *at* a large upper
bound: a valid study with 100,000 epochs is no error, only a long run, which a test cannot wait for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_bad_input import TINY

from virtualpatient.cli import main
from virtualpatient.protocol import Protocol
from virtualpatient.treatments import TREATMENTS


def _bounds(info) -> tuple[float | None, float | None]:
    low = high = None
    for m in info.metadata:
        low = getattr(m, "ge", getattr(m, "gt", low))
        high = getattr(m, "le", getattr(m, "lt", high))
    return low, high


def _leaves(cls, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """(path, FieldInfo) of every scalar or list field below the dataclass ``cls``."""
    out = []
    for name, info in cls.__pydantic_fields__.items():
        if dataclasses.is_dataclass(info.annotation) and isinstance(info.annotation, type):
            out += _leaves(info.annotation, (*prefix, name))
        elif name != "arms":
            out.append(((*prefix, name), info))
    return out


LEAVES = _leaves(Protocol, ())
for _arm in ("ketamine", "ssri", "neurosteroid"):
    LEAVES += [(("arms", _arm, name), info) for name, info in TREATMENTS[_arm].__pydantic_fields__.items()]

HOSTILE_TEXT = st.sampled_from(["../../x", "/tmp/evil", ".hidden", "a/b", "NUL", "", "x" * 300, "é", "ok_name",
                                "baseline", "Ketamine", "a\nb"])
WRONG_TYPE = st.sampled_from([[], {}, "ten", [1, "a"], {"kind": "gamma"}, True])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0, -0.0, -1.0])


def _value(info) -> st.SearchStrategy:
    kind, (low, high) = info.annotation, _bounds(info)
    if kind is int:
        near = [v for v in ((low or 0) - 1, low or 0, (low or 0) + 1, (low or 0) + 2)]
        beyond = [high + 1] if high is not None else []
        return st.sampled_from([*near, *beyond, 10**12, -(10**12), 2**64]) | WRONG_TYPE
    if kind is float:
        inside = st.floats(low if low is not None else -1e3, high if high is not None else 1e3)
        return inside | SPECIAL_FLOATS | WRONG_TYPE
    if kind is bool:
        return st.booleans() | WRONG_TYPE
    if kind is str:
        return HOSTILE_TEXT | WRONG_TYPE
    if get_origin(kind) is tuple:
        item = st.sampled_from([-1, 0, 1, 2, 3, 16_385, 10**12]) | SPECIAL_FLOATS
        return st.lists(item, max_size=5) | st.lists(st.lists(item, max_size=3), max_size=3) | WRONG_TYPE
    if get_args(kind):  # Literal, unions (covariates: numbers or distribution tables)
        options = [a for a in get_args(kind) if isinstance(a, str)]
        table = st.fixed_dictionaries({"kind": st.sampled_from(["uniform", "normal", "choice", "gamma"])},
                                      optional={"low": SPECIAL_FLOATS, "high": SPECIAL_FLOATS, "sd": SPECIAL_FLOATS,
                                                "mean": SPECIAL_FLOATS, "values": st.lists(SPECIAL_FLOATS)})
        return (st.sampled_from(options) if options else st.nothing()) | SPECIAL_FLOATS | table | WRONG_TYPE
    return WRONG_TYPE


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"


def _study_text(changes: list[tuple[tuple[str, ...], Any]], arm_name: str | None) -> str:
    data = tomllib.loads(TINY)
    for path, value in changes:
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    if arm_name is not None:
        data["arms"][arm_name] = {"treatment": "ssri", "epochs": 1}
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, body in data.items():
        if isinstance(body, dict):
            lines += _tables(_toml(table) if not table.isidentifier() else table, body)
    return "\n".join(lines) + "\n"


def _tables(name: str, body: dict) -> list[str]:
    scalars = {k: v for k, v in body.items() if not isinstance(v, dict) or "kind" in v}
    lines = [f"[{name}]", *(f"{_key(k)} = {_toml(v)}" for k, v in scalars.items())]
    for key, sub in body.items():
        if key not in scalars:
            lines += _tables(f"{name}.{_key(key)}", sub)
    return lines


def _key(key: str) -> str:
    return key if key.isidentifier() else _toml(key)


def _snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    changes=st.lists(st.sampled_from(LEAVES).flatmap(lambda leaf: st.tuples(st.just(leaf[0]), _value(leaf[1]))),
                     min_size=1, max_size=3),
    arm_name=st.none() | HOSTILE_TEXT,
)
def test_any_study_is_one_line_or_a_run_and_stays_in_its_folder(changes, arm_name):
    """Exit 2 with one error line, or exit 0 with results; no traceback, no file outside the run folder."""
    with tempfile.TemporaryDirectory() as base:
        sandbox = Path(base) / "sandbox"
        sandbox.mkdir()
        study, out = sandbox / "study.toml", sandbox / "run"
        study.write_text(_study_text(changes, arm_name))
        before = _snapshot(Path(base))
        err, cwd = io.StringIO(), os.getcwd()
        os.chdir(sandbox)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(["reproduce", "--study", str(study), "--out", str(out), "--no-progress"])
        finally:
            os.chdir(cwd)
        lines = err.getvalue().strip().splitlines()
        event(f"exit {status}")
        assert "Traceback" not in err.getvalue()
        if status == 0:
            assert (out / "results.csv").is_file()
        else:
            assert status == 2, (status, lines, study.read_text())
            assert len(lines) == 1 and lines[0].startswith("virtualpatient: error: "), lines
        written = _snapshot(Path(base)) - before
        strays = [p for p in written if not p.is_relative_to(out)]
        assert not strays, strays
