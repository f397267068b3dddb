"""The reproduction report of a run folder: ``report.md`` and a self-contained ``report.html``.

:func:`write_report` reads only the saved run (``results.csv``,
``protocol.json``, ``manifest.json`` and, if present, ``weights/``), never
re-runs the simulation, and writes:

- ``report.md`` with the figures linked from ``figures/``;
- ``report.html`` with the same content and the figures embedded (PNG as
  base64), so it can be mailed as one file;
- ``figures/*.png`` and ``figures/*.svg``.

The output is byte-identical when rebuilt from the same run folder: no
timestamps, seeded bootstraps, reproducible figure files.

A damaged or missing input, or a folder the report cannot be written into,
raises :class:`ReportError`, whose message starts with the path at fault.
Writing is all-or-nothing per file: figures are drawn into a temporary folder,
``report.md`` and ``report.html`` into temporary files, and only when all are
complete are they renamed into place (``report.md`` last), so a crash leaves
the previous report as it was. A second report on the same folder while one
is being written is refused (``flock`` on ``RUN_DIR/.report.lock``): both
would write the same bytes, so waiting buys nothing, and refusing cannot hang.
Every path written is joined through :func:`virtualpatient.names.inside`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._data import EXTREME_SIGMA, arm_order, check_results, display_name
from analysis._results import fmt_num, fmt_p
from virtualpatient.errors import VirtualPatientError
from virtualpatient.names import inside
from virtualpatient.schema import HEADLINE_PHASES, LEVELS_FILE, tag_level

__all__ = ["ReportError", "RunData", "load_run", "unfinished_sweep", "write_report"]

FIGURES_DIR = "figures"

#: The lock a report holds on its run folder while it writes (``flock``; the file stays, empty).
REPORT_LOCK = ".report.lock"

#: The report's own temporary names (as the run store's: ``.<target>.vp-XXXXXXXX.tmp``).
_TMP_INFIX, _TMP_SUFFIX = ".vp-", ".tmp"
_STALE_FILE = re.compile(r"\.report\.(?:md|html)\.vp-[a-z0-9_]{8}\.tmp")
_STALE_DIR = re.compile(r"\.figures\.vp-[a-z0-9_]{8}\.tmp")


class ReportError(VirtualPatientError, ValueError):
    """A run folder cannot be reported on: a missing or damaged input file, or a folder the report
    cannot be written into. The message starts with the path of the file or folder at fault."""

#: The arm comparisons shown in the report: (title, metric, condition, phase, sigma).
COMPARISONS = [
    ("Combined-stress accuracy (Table 1)", "accuracy", "combined", None, None),
    (f"Extreme-noise accuracy, σ = {EXTREME_SIGMA:g} (Table 2)", "accuracy", "internal_noise", None, EXTREME_SIGMA),
    ("Biased-noise accuracy (Table 3)", "accuracy", "biased", None, None),
    ("Activation magnitude (Table 3)", "activation_magnitude", "", None, None),
    ("Acute relapse drop (Table 4)", "relapse_drop", "", "acute_relapse", None),
    (
        "Manic relapse probability per patient (Table 4)",
        "relapse_probability",
        "",
        "washout",
        None,
    ),
]


@dataclass
class RunData:
    """The saved data of one run folder."""

    path: Path
    results: pd.DataFrame
    protocol: dict
    manifest: dict
    weights_dir: Path | None
    #: ``(finished, planned)`` levels when the run is a sweep whose ``results.csv`` is not yet written
    #: (still running, or interrupted): the results are then its finished levels' rows.
    partial: tuple[int, int] | None = None


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder: ``results.csv``, ``protocol.json``, ``manifest.json``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.

    Returns
    -------
    RunData
        ``results`` is validated against the schema; ``protocol`` and
        ``manifest`` are ``{}`` when their file is missing; ``weights_dir`` is
        the ``weights/`` folder if it exists.

    Raises
    ------
    ReportError
        The folder or ``results.csv`` is missing, or a file is damaged; the
        message starts with the path at fault.

    Examples
    --------
    >>> import tempfile
    >>> from analysis.synthetic import make_results, write_run
    >>> from analysis.report import load_run
    >>> run = load_run(write_run(tempfile.mkdtemp(), make_results(n_patients=2)))
    >>> run.protocol["n_patients"]
    2
    """
    if not isinstance(run_dir, (str, Path)):
        raise TypeError(f"run_dir must be a str or Path, got {type(run_dir).__name__}")
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path}: run folder not found")
    csv_path = path / "results.csv"
    partial = unfinished_sweep(path)
    if partial is not None:
        fields, levels, _ = _sweep_plan(path)
        results = pd.concat([tag_level(_read_results(inside(path, "levels", lv["name"], "results.csv")), fields,
                                       lv["values"], lv["cohort"]) for lv in _finished(path, levels)],
                            ignore_index=True)
        if partial[0] == partial[1]:
            partial = None  # every level finished; only the sweep's own results.csv was not written
    elif csv_path.is_file():
        results = _read_results(csv_path)
    else:
        raise ReportError(f"{path}: has no results.csv; is it a run folder?")
    docs = {}
    for name in ("protocol", "manifest"):
        f = path / f"{name}.json"
        if f.is_file():
            try:
                docs[name] = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
                raise ReportError(f"{f}: is not valid JSON ({_first_line(exc)})") from None
            if not isinstance(docs[name], dict):
                raise ReportError(f"{f}: must hold a JSON object")
        else:
            docs[name] = {}
    wdir = path / "weights"
    return RunData(
        path, results, docs["protocol"], docs["manifest"], wdir if wdir.is_dir() else None, partial
    )


_LEVEL_NAME = re.compile(r"L[0-9a-f]{12}")


def unfinished_sweep(run_dir: str | Path) -> tuple[int, int] | None:
    """``(finished, planned)`` levels of a sweep folder whose last run has not finished (still
    running, or interrupted), else ``None``. A sweep writes its plan (``levels.json``) with
    ``"finished": false`` when it starts and sets it once its ``results.csv`` is written; until then
    the results are read from the levels that finished (a finished sweep resumed with more levels
    keeps an older ``results.csv`` that lacks them).

    Raises
    ------
    ReportError
        The plan is damaged or hostile, or no level has finished yet.
    """
    path = Path(run_dir)
    csv_path = path / "results.csv"
    if not (path / LEVELS_FILE).is_file():
        return None
    _, levels, finished = _sweep_plan(path)
    if finished and csv_path.is_file():
        return None
    done = len(_finished(path, levels))
    if not done:
        raise ReportError(f"{path}: no level of the sweep has finished yet (0 of {len(levels)}); nothing to report")
    return done, len(levels)


def _sweep_plan(path: Path) -> tuple[list[str], list[dict], bool]:
    """A sweep folder's swept fields, levels and whether its run finished, checked (a level name
    must be a level folder's)."""
    plan_path = path / LEVELS_FILE
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        fields, levels = plan["fields"], plan["levels"]
        if not (isinstance(fields, list) and all(isinstance(f, str) for f in fields) and isinstance(levels, list)):
            raise ValueError("fields must be a list of names and levels a list")
        for lv in levels:
            if not (isinstance(lv, dict) and isinstance(lv.get("name"), str) and _LEVEL_NAME.fullmatch(lv["name"])
                    and isinstance(lv.get("values"), dict) and type(lv.get("cohort")) is int):
                raise ValueError(f"bad level entry {str(lv)[:80]}")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ReportError(f"{plan_path}: is not a sweep plan ({_first_line(exc)})") from None
    return fields, levels, plan.get("finished") is True


def _finished(path: Path, levels: list[dict]) -> list[dict]:
    return [lv for lv in levels if inside(path, "levels", lv["name"], "results.csv").is_file()]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def _read_results(path: Path) -> pd.DataFrame:
    """``results.csv`` read and checked against the schema, or :class:`ReportError` saying why not."""
    try:
        raw = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise ReportError(f"{path}: is empty (no header, no rows); rerun the study to rewrite it") from None
    except (OSError, ValueError, csv.Error) as exc:  # ParserError and UnicodeDecodeError are ValueErrors
        raise ReportError(f"{path}: cannot be read as a results table ({_first_line(exc)})") from None
    try:
        results = check_results(raw, name=str(path))
    except (TypeError, ValueError) as exc:  # the message starts with the path and a space
        message = _first_line(exc)
        if message.startswith(f"{path} "):
            message = f"{path}: {message[len(str(path)) + 1:]}"
        raise ReportError(message) from None
    if results.empty:
        raise ReportError(f"{path}: has a header but no rows")
    for col in ("noise_sigma", "maintenance_epochs", "step", "value"):
        values = results[col].to_numpy(dtype=float)
        bad = np.isinf(values) | (np.isnan(values) if col == "value" else False)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ReportError(
                f"{path}: data row {row + 1} has {'a missing' if np.isnan(values[row]) else 'an infinite'} {col}; "
                "a damaged file: rerun the study to rewrite it"
            )
    return results


# --------------------------------------------------------------------------- blocks
# The report is a list of blocks rendered twice, to Markdown and to HTML.


@dataclass
class _Block:
    kind: str  # "h1", "h2", "h3", "p", "table", "pre", "figure", "note"
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: Path | None = None
    name: str = ""


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _to_markdown(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "note":
            out.append(f"> {b.text}")
        elif b.kind == "pre":
            out.append("```text\n" + b.text.rstrip("\n") + "\n```")
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out[-1] += "\n|" + "|".join("---" for _ in b.header) + "|"
            for r in b.rows:
                out[-1] += "\n| " + " | ".join(_md_cell(c) for c in r) + " |"
        elif b.kind == "figure":
            rel = f"{FIGURES_DIR}/{b.name}"
            out.append(f"![{b.name}]({rel}.png)\n\n*Figure: {b.text}* ([SVG]({rel}.svg))")
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#111;line-height:1.4}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.85em}
th,td{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eee}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.8em}
blockquote{border-left:4px solid #999;margin:0.5em 0;padding:0.2em 0.8em;color:#333}
figure{margin:1.2em 0}
figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:0.9em;font-style:italic}
.reproduced{font-weight:bold}
.not-reproduced{font-weight:bold;text-decoration:underline}
"""


def _to_html(blocks: list[_Block], title: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "note":
            out.append(f"<blockquote>{_inline(b.text)}</blockquote>")
        elif b.kind == "pre":
            out.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "table":
            rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>"]
            for r in b.rows:
                cells = []
                for c in r:
                    cls = {"reproduced": "reproduced", "holds": "reproduced", "not reproduced": "not-reproduced",
                           "does not hold": "not-reproduced", "differs": "not-reproduced"}.get(c)
                    attr = f' class="{cls}"' if cls else ""
                    cells.append(f"<td{attr}>{e(c)}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            out.append("<table>\n" + "\n".join(rows) + "\n</table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{e(b.name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(b.text)}</figcaption></figure>"
            )
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# --------------------------------------------------------------------------- sections


def _value(v: object) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(", ", ": "))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


#: Manifest keys not shown: clock times would make the report differ between identical runs.
_TIME_WORDS = ("start", "finish", "end", "time", "date", "clock")


def _manifest_rows(manifest: Mapping) -> list[list[str]]:
    """Manifest entries to show: scalars and one level of plain dicts (versions); the protocol
    (shown elsewhere), other nested entries and clock times are left out."""
    rows = []
    for key, value in manifest.items():
        if any(w in str(key).lower() for w in _TIME_WORDS):
            continue
        if isinstance(value, dict) and key != "protocol":
            # one level of plain values, e.g. library versions
            flat = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
            if len(flat) == len(value):
                rows += [[f"{key}.{k}", _value(v)] for k, v in flat.items()]
            continue
        if isinstance(value, (dict, list)):
            if key == "sessions" and isinstance(value, list):
                rows.append(["sessions", str(len(value))])
            continue
        rows.append([str(key), _value(value)])
    return rows


def _header_section(run: RunData, df: pd.DataFrame) -> list[_Block]:
    arms = arm_order(df)
    name = run.protocol.get("name") or run.manifest.get("study") or run.path.name
    paper = is_paper_schedule(df) and not sweep_columns(df) and not (run.protocol or {}).get("compare_with")
    blocks = [
        _Block("h1", f"{'Reproduction report' if paper else 'Study report'}: {name}"),
        _Block(
            "p",
            f"Run folder `{run.path.name}`: {df['patient'].nunique()} virtual patients, arms "
            + ", ".join(f"{display_name(a)} (`{a}`)" for a in arms)
            + ". Everything below is computed from the saved "
            + ("`results.csv`" if run.partial is None else "`results.csv` of every finished level")
            + ", `protocol.json` "
            "and `manifest.json`; nothing is re-simulated."
            + (" Paper: *Modeling Antidepressant-Induced Manic Switch and Longitudinal Relapse* "
               "(Tables 1-4 and Results)." if paper else ""),
        ),
    ]
    if run.partial is not None:
        done, planned = run.partial
        blocks.append(_Block(
            "p",
            f"**Unfinished sweep: {done} of {planned} levels have finished.** The run is still going "
            "or was interrupted; every table and figure below covers the finished levels only. Run "
            "the same `virtualpatient run` command again to finish it, then report again.",
        ))
    if paper:
        blocks.append(_Block(
            "p",
            "Agreement with the published numbers is judged in our own spread: the deviation "
            "is (our mean - paper mean) / our SD (population SD, ddof = 0, as in the paper). "
            "Random streams differ from the authors', so exact agreement is not expected; a "
            "difference is a finding, not a fault to tune away.",
        ))
    rows = _manifest_rows(run.manifest)
    if rows:
        blocks += [
            _Block("h2", "Run manifest"),
            _Block("table", header=["field", "value"], rows=rows),
        ]
    blocks.append(_Block("h2", "Protocol interpretations in force"))
    interp = run.protocol.get("interpretations") if run.protocol else None
    if isinstance(interp, Mapping) and interp:
        blocks.append(
            _Block(
                "p",
                "Where the paper's text and the authors' published notebook differ, the run "
                "used these options (see `docs/protocol.md`):",
            )
        )
        blocks.append(
            _Block(
                "table",
                header=["field", "value in force"],
                rows=[[str(k), _value(v)] for k, v in interp.items()],
            )
        )
    else:
        blocks.append(_Block("note", "protocol.json lists no interpretations."))
    return blocks


def _tables_section(df: pd.DataFrame, protocol: dict, n_resamples: int, seed: int) -> list[_Block]:
    from analysis.summaries import bootstrap_ci, t_ci
    from analysis.tables import TABLE_TITLES, TableColumn, cell_values, compare_published

    cmp = compare_published(df, protocol=protocol)
    blocks = [
        _Block("h2", "The paper's tables, ours beside the published values"),
        _Block(
            "p",
            "Each row: our mean ± SD across patients, the 95 % confidence interval of our mean "
            "(t and BCa bootstrap), the published mean ± SD, and the deviation in our SD units. "
            "The deviation is ±inf when our SD is 0 and the means differ at the paper's printed precision.",
        ),
    ]
    header = [
        "measure",
        "arm",
        "n",
        "ours mean ± SD",
        "95 % CI (t)",
        "95 % CI (bootstrap)",
        "paper",
        "deviation (our SD)",
    ]
    for table in ["Table 1", "Table 2", "Table 3", "Table 4", "Off medication"]:
        part = cmp[cmp["table"] == table]
        if part.empty:
            continue
        title = (
            f"{table}. {TABLE_TITLES[table]}"
            if table != "Off medication"
            else ("Neurosteroid-like off medication (damping module off; paper: Results text)")
        )
        if table == "Table 4":
            part = part[~part["metric"].isin(["accuracy", "gain", "activation_magnitude"])]
        rows = []
        for _, r in part.iterrows():
            d = int(r["decimals"])
            if r["n"] == 0 and math.isnan(r["paper_mean"]):
                continue
            sigma = None if math.isnan(r["noise_sigma"]) else float(r["noise_sigma"])
            col = TableColumn(r["column"], r["metric"], r["condition"], sigma, r["phase"], d)
            vals = cell_values(df, col, r["arm"], protocol).to_numpy(dtype=float)
            if r["metric"] == "decay_rate":
                t_int = b_int = "-"
            else:
                t_int = _interval(*t_ci(vals), d)
                b_int = _interval(*bootstrap_ci(vals, n_resamples=n_resamples, seed=seed), d)
            if r["n"] == 0:
                ours = "n/a"
            elif r["metric"] == "decay_rate":
                ours = f"{fmt_num(r['mean'], d)} (protocol)"
            else:
                ours = f"{fmt_num(r['mean'], d)} ± {fmt_num(r['sd'], d)}"
            if math.isnan(r["paper_mean"]):
                paper = "n/a"
            elif math.isnan(r["paper_sd"]):
                paper = fmt_num(r["paper_mean"], d)
            else:
                paper = f"{fmt_num(r['paper_mean'], d)} ± {fmt_num(r['paper_sd'], d)}"
            rows.append(
                [
                    r["column"],
                    display_name(r["arm"]),
                    str(int(r["n"])),
                    ours,
                    t_int,
                    b_int,
                    paper,
                    fmt_num(r["deviation_sd"], 2),
                ]
            )
        blocks += [_Block("h3", title)]
        if table == "Table 4":
            blocks.append(
                _Block(
                    "p",
                    "Rows of Table 4 repeated from Tables 1 and 3 (combined "
                    "and biased stress, gain, activation) are shown there.",
                )
            )
        blocks.append(_Block("table", header=header, rows=rows))
    return blocks


def _interval(lo: float, hi: float, d: int) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    return f"[{fmt_num(lo, d)}, {fmt_num(hi, d)}]"


def _claims_section(df: pd.DataFrame, protocol: dict) -> list[_Block]:
    from analysis.claims import evaluate_claims

    res = evaluate_claims(df, protocol)
    counts = res.frame["status"].value_counts()
    rows = [
        [r["id"], r["claim"], r["source"], r["test"], r["evidence"], r["status"]]
        for _, r in res.frame.iterrows()
    ]
    return [
        _Block("h2", "The paper's qualitative claims"),
        _Block(
            "p",
            f"{counts.get('reproduced', 0)} reproduced, {counts.get('not reproduced', 0)} not "
            f"reproduced, {counts.get('not testable', 0)} not testable on this run. Ordering "
            "claims are decided by one-sided paired Wilcoxon signed-rank tests across patients "
            f"at alpha = {res.alpha} (Holm within a claim); with n patients the smallest "
            "attainable one-sided p is 2^-n, so a run with fewer than 5 patients cannot "
            "reproduce an ordering claim.",
        ),
        _Block(
            "table",
            header=["id", "claim", "paper", "deciding test", "evidence", "status"],
            rows=rows,
        ),
    ]


def _comparison_blocks(df: pd.DataFrame, n_resamples: int, seed: int) -> list[_Block]:
    from analysis.stats import compare_arms

    blocks = [
        _Block("h2", "Arm comparisons within patients"),
        _Block(
            "p",
            "Every patient receives every arm from the same pruned baseline, so arms are "
            "compared as repeated measures: Friedman and repeated-measures ANOVA (with "
            "Shapiro-Wilk on the residuals, Mauchly's sphericity test and the "
            "Greenhouse-Geisser correction) across arms; Wilcoxon signed-rank and paired t "
            "tests between pairs, Holm-adjusted within each test; effect sizes are the "
            "matched-pairs rank-biserial correlation (bootstrap CI) and Cohen's d_z "
            "(noncentral-t CI).",
        ),
    ]
    for title, metric, condition, phase, sigma in COMPARISONS:
        try:
            cmp = compare_arms(
                df, metric, condition, phase, noise_sigma=sigma, n_resamples=n_resamples, seed=seed
            )
        except ValueError as exc:
            blocks += [_Block("h3", title), _Block("note", f"Not computed: {exc}")]
            continue
        om = cmp.omnibus.set_index("test")
        parts = []
        for test, label in [
            ("friedman", "Friedman"),
            ("rm_anova", "RM-ANOVA"),
            ("rm_anova_gg", "RM-ANOVA (Greenhouse-Geisser)"),
        ]:
            r = om.loc[test]
            if math.isnan(r["pvalue"]):
                parts.append(f"{label}: not computed ({r['note']})")
            else:
                parts.append(
                    f"{label}: statistic {fmt_num(r['statistic'], 2)}, "
                    f"p {fmt_p(r['pvalue'])}, {r['effect_size_name']} "
                    f"{fmt_num(r['effect_size'], 2)}"
                )
        verdict = (
            "RM-ANOVA assumptions met."
            if cmp.rm_anova_valid
            else "RM-ANOVA assumptions not met or not checkable; Friedman decides."
        )
        rows = [
            [
                f"{display_name(r['arm_a'])} - {display_name(r['arm_b'])}",
                r["test"],
                fmt_num(r["mean_diff"], 3),
                fmt_num(r["statistic"], 2),
                fmt_p(r["pvalue"]),
                fmt_p(r["pvalue_holm"]),
                f"{r['effect_size_name']} {fmt_num(r['effect_size'], 2)} "
                f"[{fmt_num(r['conf_int_low'], 2)}, {fmt_num(r['conf_int_high'], 2)}]",
            ]
            for _, r in cmp.pairwise.iterrows()
        ]
        blocks += [
            _Block("h3", f"{title} (n = {cmp.n})"),
            _Block("p", "; ".join(parts) + ". " + verdict),
            _Block(
                "table",
                header=[
                    "pair (a - b)",
                    "test",
                    "mean diff",
                    "statistic",
                    "p",
                    "p (Holm)",
                    "effect size [95 % CI]",
                ],
                rows=rows,
            ),
        ]
    return blocks


def _relapse_section(df: pd.DataFrame, protocol: dict) -> list[_Block]:
    from analysis.longitudinal import relapse_gee, washout_mixedlm
    from analysis.summaries import relapse_probability
    from analysis.survival import cox, kaplan_meier, logrank, time_to_relapse

    blocks = [_Block("h2", "Longitudinal relapse")]
    try:
        rp = relapse_probability(df)
    except ValueError as exc:
        return [*blocks, _Block("note", f"No relapse analysis: {exc}")]
    rows = [
        [
            display_name(r["arm"]),
            f"{int(r['relapsed'])}/{int(r['n'])}",
            fmt_num(r["probability"], 1),
            f"[{fmt_num(r['conf_int_low'], 1)}, {fmt_num(r['conf_int_high'], 1)}]",
            f"{fmt_num(r['patient_mean'], 1)} ± {fmt_num(r['patient_sd'], 1)}",
        ]
        for _, r in rp.frame.iterrows()
    ]
    blocks += [
        _Block("h3", "Relapse probability"),
        _Block(
            "table",
            header=[
                "arm",
                "relapsed / n",
                "probability (%)",
                "95 % Wilson CI (%)",
                "per-patient mean ± SD (%)",
            ],
            rows=rows,
        ),
        _Block(
            "note",
            "Wilson intervals treat each patient x duration as independent; the "
            "GEE below accounts for the clustering by patient.",
        ),
        _Block("h3", "Relapse ~ arm + maintenance duration (binomial GEE)"),
        _Block("pre", relapse_gee(df).summary()),
        _Block("h3", "Post-wash-out biased accuracy ~ arm x duration (mixed model)"),
    ]
    try:
        blocks.append(_Block("pre", washout_mixedlm(df).summary()))
    except ValueError as exc:
        blocks.append(_Block("note", f"Not computed: {exc}"))
    blocks.append(_Block("h3", "Time to relapse during wash-out"))
    try:
        ttr = time_to_relapse(df, protocol)
    except ValueError as exc:
        return [*blocks, _Block("note", f"Not computed: {exc}")]
    km = kaplan_meier(ttr)
    blocks.append(_Block("pre", km.summary()))
    if ttr["arm"].nunique() > 1:
        blocks.append(_Block("pre", logrank(ttr).summary()))
        blocks.append(_Block("pre", logrank(ttr, strata="maintenance_epochs").summary()))
    blocks.append(_Block("pre", cox(ttr).summary()))
    return blocks


#: Outcomes a sweep section reports for each swept field: (title, metric, condition, phases,
#: decimals of a level's mean). Efficiency, the two manic-switch proxies (biased accuracy and
#: activation magnitude) and the two relapse measures. The phases are the paper's (treated and
#: untreated state); a schedule that has none of them gets its outcome at every phase that measured
#: it (e.g. a lesion sweep's ``pruned``, a family ``battery``).
SWEEP_OUTCOMES = [
    ("Combined-stress accuracy (%)", "accuracy", "combined", HEADLINE_PHASES, 1),
    ("Biased-noise accuracy (%)", "accuracy", "biased", HEADLINE_PHASES, 1),
    ("Activation magnitude (mean |h|)", "activation_magnitude", "", HEADLINE_PHASES, 3),
    ("Acute-relapse drop in combined accuracy (points)", "relapse_drop", "", ("acute_relapse",), 2),
    ("Relapse probability (%) over maintenance durations", "relapse_probability", "", ("washout",), 1),
]


def _outcome_phases(rows: pd.DataFrame, metric: str, condition: str, preferred: tuple[str, ...]) -> list[str]:
    """The phases a sweep outcome is reported at: the preferred ones present, else every phase
    with such rows (not wash-out steps or maintenance durations), in the order they appear."""
    sel = rows[(rows["metric"] == metric) & (rows["condition"] == condition)
               & rows["step"].isna() & rows["maintenance_epochs"].isna()]
    present = list(dict.fromkeys(sel["phase"]))
    return [p for p in preferred if p in present] or present


def sweep_columns(df: pd.DataFrame) -> list[str]:
    """The swept fields of a sweep's results (numeric columns beyond the schema, its covariates
    and ``cohort``), in table order; empty for a plain run."""
    from virtualpatient.schema import COLUMNS

    known = set(COLUMNS) | {"cohort", "prune_fraction", "regrowth_fraction", "lr_scale", "gain_sensitivity",
                            "protection_scale", "time", "cycle", "label"}
    return [c for c in df.columns if c not in known and pd.api.types.is_numeric_dtype(df[c])]


def _with_relapse_probability(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``df`` plus one ``relapse_probability`` row per patient, arm and level: 100 x the share of
    maintenance durations after which the patient relapsed (Table 4's measure)."""
    relapsed = df[df["metric"] == "relapsed"]
    if relapsed.empty:
        return df
    keys = [*by, "cohort", "patient", "arm"] if "cohort" in df else [*by, "patient", "arm"]
    per = relapsed.groupby(keys, dropna=False)["value"].mean().mul(100).reset_index()
    per = per.assign(phase="washout", metric="relapse_probability", condition="", noise_sigma=np.nan,
                     maintenance_epochs=np.nan, step=np.nan)
    return pd.concat([df, per], ignore_index=True)


def _sweep_section(df: pd.DataFrame, out_dir: Path, n_resamples: int, seed: int) -> list[_Block]:
    """Per swept field and outcome: mean and CI per level and arm, the repeated-measures trend test,
    the 4-parameter logistic midpoint (or why it does not fit), the steepest drop, and a figure."""
    from analysis import dose_response as dr

    fields = sweep_columns(df)
    if not fields:
        return []
    blocks = [_Block("h2", "Sweep"), _Block("p", (
        f"Swept: {', '.join(f'`{f}`' for f in fields)}. Each patient is measured at every level it "
        "ran (shared baselines), so the trend test is a GEE clustered by patient (t on patients - 1 df) "
        "and every interval resamples whole patients (docs/dose-response.md).")),
    ]
    df = _with_relapse_probability(df, fields)
    for field_name in fields:
        others = {f: None for f in fields if f != field_name}
        rows = df[df[field_name].notna() & df[[*others]].isna().all(axis=1)] if others else df[df[field_name].notna()]
        if rows[field_name].nunique() < 2:
            continue
        outcomes = [(f"{title}, `{phase}`", metric, condition, phase, decimals)
                    for title, metric, condition, preferred, decimals in SWEEP_OUTCOMES
                    for phase in _outcome_phases(rows, metric, condition, preferred)]
        for title, metric, condition, phase, decimals in outcomes:
            sel = rows[(rows["metric"] == metric) & (rows["phase"] == phase) & (rows["condition"] == condition)]
            sel = sel[sel["step"].isna() & sel["maintenance_epochs"].isna()]
            if sel.empty or sel[field_name].nunique() < 2:
                continue
            if sel.groupby(["arm", "patient"])["value"].nunique().le(1).all():  # e.g. a shared spine's rows
                blocks.append(_Block("note", f"{title}: the same at every level of `{field_name}`."))
                continue
            args = dict(metric=metric, condition=condition or None, phase=phase)
            summary = dr.level_summary(sel, field_name, **args)
            trend = dr.trend_test(sel, field_name, **args)
            fit = dr.fit_logistic(sel, field_name, **args, n_resamples=min(n_resamples, 500), seed=seed)
            drop = dr.cliff(sel, field_name, **args, n_resamples=min(n_resamples, 1000), seed=seed)
            blocks.append(_Block("h3", f"{title} vs `{field_name}`"))
            blocks.append(_Block("table", header=["arm", "level", "n", "mean", "95 % CI"], rows=[
                [display_name(r["arm"]), f"{r['level']:g}", str(int(r["n"])), fmt_num(r["mean"], decimals),
                 _interval(r["conf_int_low"], r["conf_int_high"], decimals)] for _, r in summary.iterrows()]))
            per_arm = []
            for t, f_row, c_row in zip(trend.table.to_dict("records"), fit.table.to_dict("records"),
                                       drop.table.to_dict("records"), strict=True):
                ci = _interval(f_row["midpoint_ci_low"], f_row["midpoint_ci_high"], 3)
                midpoint = f"{f_row['midpoint']:.3g} {ci}" if f_row["fitted"] else f"no fit: {f_row['reason']}"
                steepest = (f"{c_row['level_from']:g} -> {c_row['level_to']:g}: {c_row['rate']:.3g} per unit "
                            f"{_interval(c_row['rate_ci_low'], c_row['rate_ci_high'], 3)}"
                            if math.isfinite(c_row["rate"]) else c_row["note"])
                slope = f"{t['slope']:.3g} {_interval(t['conf_int_low'], t['conf_int_high'], 3)}"
                per_arm.append([display_name(t["arm"]), slope, fmt_p(t["pvalue"]), midpoint, steepest])
            blocks.append(_Block("table", header=["arm", "slope per unit (95 % CI)", "trend p", "logistic midpoint",
                                                  "steepest drop (95 % CI)"], rows=per_arm))
            figure = dr.plot_dose_response(sel, field_name, **args, fit=fit)
            name = f"sweep_{len(blocks)}"
            png = out_dir / f"{name}.png"
            figure.savefig(png, dpi=110, bbox_inches="tight")
            figure.savefig(png.with_suffix(".svg"), bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(figure)
            blocks.append(_Block("figure", f"{title} against {field_name}: mean and 95 % CI per level, "
                                           "the fitted logistic and its midpoint.", image=png, name=name))
    return blocks


#: Share of drawn cohorts a claim must reach for its "smallest cohort size" (issue: 80 % of cohorts).
COHORT_TARGET = 0.8


def _pct(share: float) -> str:
    return f"{100 * share:g} %"


def cohort_sizes(pool: int) -> list[int]:
    """Cohort sizes the report draws from a pool of ``pool`` patients: multiples of 5 up to half the
    pool (drawn without replacement, a larger cohort would mostly repeat the same patients; see
    :func:`analysis.replication.smallest_cohort`), or half the pool when that is below 5."""
    half = pool // 2
    return list(range(5, half + 1, 5)) if half >= 5 else [max(half, 1)]


def _replication_section(df: pd.DataFrame, protocol: dict, out_dir: Path, cohort_draws: int, seed: int,
                         progress=None) -> list[_Block]:
    """For the paper's study in several cohorts: each claim's share of cohorts with a Wilson CI and,
    with ``cohort_draws``, the smallest cohort size at which it holds in 80 % of drawn cohorts."""
    from analysis.claims import evaluate_claims
    from analysis.figures import save_figure
    from analysis.replication import plot_cohort_size, replication_table, smallest_cohort

    if "cohort" not in df or df["cohort"].nunique() < 2 or sweep_columns(df):
        return []
    if not {"ketamine", "ssri", "neurosteroid"} <= set(df["arm"]):
        return []

    def decide(frame: pd.DataFrame) -> dict:
        verdicts = evaluate_claims(frame.drop(columns="cohort"), protocol).frame
        return {r["id"]: None if r["status"] == "not testable" else r["status"] == "reproduced"
                for _, r in verdicts.iterrows()}

    rep = replication_table(df, decide)
    n_cohorts = df["cohort"].nunique()
    pool = int(df[["cohort", "patient"]].drop_duplicates().shape[0])
    header = ["claim", "cohorts testable", "holds in", "share", "95 % CI"]
    rows = [[str(r["claim"]), str(int(r["n_testable"])), str(int(r["n_hold"])),
             f"{100 * r['share']:.0f} %" if r["n_testable"] else "-",
             _interval(100 * r["conf_int_low"], 100 * r["conf_int_high"], 0)] for _, r in rep.table.iterrows()]
    blocks = [_Block("h2", "Replication across cohorts"), _Block("p", (
        f"{n_cohorts} independent cohorts; each claim decided on each cohort as in the claims "
        "table; share of the cohorts where it could be tested, with a Wilson 95 % CI."))]
    sizes = cohort_sizes(pool)
    if cohort_draws < 1:
        blocks.append(_Block("table", header=header, rows=rows))
        blocks.append(_Block("p", (
            f"The smallest cohort size at which each claim holds in {_pct(COHORT_TARGET)} of cohorts was not "
            f"computed (`--cohort-draws 0`); `virtualpatient report RUN --cohort-draws 20` adds it (20 cohorts "
            f"drawn from the {pool} patients at each of the sizes {', '.join(map(str, sizes))}).")))
        return blocks
    curve = smallest_cohort(df, decide, sizes, target=COHORT_TARGET, n_resamples=cohort_draws, seed=seed,
                            progress=progress)
    smallest = curve.table.set_index("claim")
    header += [f"smallest size for {_pct(COHORT_TARGET)}", "share there (95 % CI)"]
    for row in rows:
        c = smallest.loc[row[0]] if row[0] in smallest.index else None
        if c is None or not np.isfinite(c["smallest_size"]):
            best = "-" if c is None else f"{100 * c['max_share']:.0f} % at most"
            row += [f"> {max(sizes)}", best]
        else:
            row += [str(int(c["smallest_size"])), f"{100 * c['share_at_smallest']:.0f} % "
                    f"{_interval(100 * c['conf_int_low'], 100 * c['conf_int_high'], 0)}"]
    blocks.append(_Block("table", header=header, rows=rows))
    png, _ = save_figure(plot_cohort_size(curve), out_dir, "cohort_size")
    blocks.append(_Block("p", (
        f"Smallest cohort size: {cohort_draws} cohorts of each size {', '.join(map(str, sizes))} drawn "
        f"without replacement from the {pool} patients of all cohorts (seed {seed}); the smallest size from "
        f"which the share stays at or above {_pct(COHORT_TARGET)} at every larger size drawn, with the "
        "share's Wilson 95 % CI. Sizes stop at half the pool, so a claim that needs more shows \"> "
        f"{max(sizes)}\".")))
    blocks.append(_Block("figure", "Share of drawn cohorts in which each claim holds, by cohort size, with "
                                   f"Wilson 95 % bands; dashed: the {_pct(COHORT_TARGET)} target.", image=png,
                         name="cohort_size"))
    return blocks


def is_paper_schedule(df: pd.DataFrame) -> bool:
    """Whether a run's rows come from the paper's schedule (only its phases, each once per arm: no
    row labelled apart from its phase), so the paper's tables and claims apply; a schedule the
    paper never had gets trajectories instead."""
    from virtualpatient.schema import PAPER_PHASES

    if not set(df["phase"]) <= set(PAPER_PHASES):
        return False
    if "label" not in df:  # written before schedules: the paper's course
        return True
    labels = df["label"]
    return bool((labels.isna() | (labels.astype(str) == df["phase"].astype(str))).all())


#: Trajectories a schedule's report shows: (title, metric, condition).
TRAJECTORIES = [("Combined-stress accuracy (%)", "accuracy", "combined"),
                ("Biased-noise accuracy (%)", "accuracy", "biased")]


def _schedule_section(df: pd.DataFrame, out_dir: Path) -> list[_Block]:
    """For a schedule the paper never had: per-arm trajectories over the trial clock (table and
    figure) and the share of patients ever judged relapsed, with a Wilson CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.replication import wilson_ci
    from analysis.trajectories import trajectory

    blocks = [_Block("h2", "Trajectories over trial time"), _Block("p", (
        "This schedule is not the paper's, so its tables and claims do not apply. Each point: the mean "
        "over patients (95 % t interval) of the arm's measurements at that trial time (training epochs "
        "since the lesion); a patient measured several times at one point counts once."))]
    for title, metric, condition in TRAJECTORIES:
        traj = trajectory(df[df["step"].isna()], metric, condition)
        if traj.empty:
            continue
        blocks.append(_Block("h3", title))
        blocks.append(_Block("table", header=["arm", "time", "n", "mean", "95 % CI"], rows=[
            [display_name(r["arm"]), f"{r['time']:g}", str(int(r["n"])), f"{r['mean']:.1f}",
             _interval(r["ci_low"], r["ci_high"], 1)] for _, r in traj.iterrows()]))
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, g in traj.groupby("arm", sort=False):
            ax.errorbar(g["time"], g["mean"], yerr=[g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]],
                        marker="o", capsize=3, label=display_name(arm))
        ax.set_xlabel("trial time (epochs since the lesion)")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
        name = f"trajectory_{metric}_{condition}"
        png = out_dir / f"{name}.png"
        fig.savefig(png, dpi=110, bbox_inches="tight")
        fig.savefig(png.with_suffix(".svg"), bbox_inches="tight")
        plt.close(fig)
        blocks.append(_Block("figure", f"{title} per arm over trial time, mean and 95 % CI.", image=png, name=name))
    relapsed = df[df["metric"] == "relapsed"]
    if relapsed.empty:
        return blocks
    washouts = relapsed[relapsed["phase"] == "washout"]
    if "label" in df and washouts.groupby("arm")["label"].nunique().gt(1).any():
        return [*blocks, *_washouts_section(df)]
    ever = relapsed.groupby(["arm", "patient"])["value"].max().groupby("arm")
    rows = []
    for arm, v in ever:
        k, n = int(v.sum()), int(v.size)
        lo, hi = wilson_ci(k, n)
        rows.append([display_name(arm), f"{k} / {n}", _interval(100 * lo, 100 * hi, 0)])
    blocks += [_Block("h3", "Relapse"), _Block("p", "Patients judged relapsed at any wash-out of the arm "
                                                   "(Wilson 95 % CI, percent)."),
               _Block("table", header=["arm", "relapsed", "95 % CI"], rows=rows)]
    return blocks


def _washouts_section(df: pd.DataFrame) -> list[_Block]:
    """Several wash-outs of the same networks (labels, e.g. one per decay rate): relapse per arm and
    wash-out, and the arms' ranking under each with paired tests (``summaries.relapse_ranking``)."""
    from analysis.summaries import relapse_probability, relapse_ranking

    rp = relapse_probability(df, by_label=True)
    rank = relapse_ranking(df)
    blocks = [
        _Block("h3", "Relapse after each wash-out"),
        _Block("p", "Each wash-out label washes out the same maintained networks (a probe on a copy). "
                    "Relapse probability: the share of patient x maintenance duration judged relapsed "
                    "(Table 4's measure), Wilson 95 % CI; per patient: mean ± SD of the patients' own shares."),
        _Block("table", header=["arm", "wash-out", "relapsed / n", "probability (%)", "95 % Wilson CI (%)",
                                "per patient (%)"], rows=[
            [display_name(r["arm"]), r["label"], f"{int(r['relapsed'])}/{int(r['n'])}", fmt_num(r["probability"], 1),
             _interval(r["conf_int_low"], r["conf_int_high"], 1),
             f"{fmt_num(r['patient_mean'], 1)} ± {fmt_num(r['patient_sd'], 1)}"] for _, r in rp.frame.iterrows()]),
        _Block("h3", "Relapse ranking per wash-out"),
        _Block("p", "Arms from least to most relapse under each wash-out; each adjacent pair compared on the "
                    "same patients (two-sided Wilcoxon signed-rank on the per-patient relapse percentages). "
                    + "; ".join(f"{label}: {rank.order_text(label, display_name)}" for label in rank.orders) + "."),
        _Block("table", header=["wash-out", "pair", "relapse (%)", "per-patient difference", "n", "p"], rows=[
            [r["label"], f"{display_name(r['lower'])} {r['relation']} {display_name(r['higher'])}",
             f"{fmt_num(r['lower_probability'], 1)} vs {fmt_num(r['higher_probability'], 1)}",
             fmt_num(r["difference"], 1), str(int(r["n_patients"])), fmt_p(r["pvalue"])]
            for _, r in rank.frame.iterrows()]),
    ]
    return blocks


def _sheet_section(run: RunData, df: pd.DataFrame, out_dir: Path) -> list[_Block]:
    """For a study that names a family sheet (``compare_with``): the sheet's published numbers beside
    ours, its findings decided by tests, and (068E) the kindling table and figure (``analysis.family``)."""
    sheet_id = run.protocol.get("compare_with") if run.protocol else None
    if not sheet_id:
        return []
    from analysis.family import SHEETS, compare_published, decide_findings
    from analysis.family.compare import DIFFERS_RULE

    if sheet_id not in SHEETS:
        return [_Block("h2", f"Published numbers of sheet {sheet_id}"),
                _Block("note", f"This version of `analysis.family` does not carry sheet {sheet_id} "
                               f"(it knows {', '.join(SHEETS) or 'none'}).")]
    sheet = SHEETS[sheet_id]
    first = df[df["cohort"] == df["cohort"].min()] if "cohort" in df else df
    try:
        cmp, found = compare_published(first, sheet), decide_findings(first, sheet)
    except ValueError as exc:  # rows the sheet's readers cannot take; the rest of the report still helps
        return [_Block("h2", f"Published numbers of sheet {sheet_id}"), _Block("note", f"Not computed: {exc}")]
    counts, verdicts = cmp.frame["verdict"].value_counts(), found.frame["verdict"].value_counts()
    blocks = [
        _Block("h2", f"Published numbers of sheet {sheet.id}"),
        _Block("p", f"Sheet {sheet.id} ({sheet.title}; `{sheet.source}`): the published mean ± population SD over "
                    f"{sheet.n_published} seed{'s' if sheet.n_published > 1 else ''} beside ours over patients, "
                    f"with the 95 % t interval of our mean. {counts.get('within spread', 0)} within spread, "
                    f"{counts.get('differs', 0)} differ, {counts.get('not in this run', 0)} not in this run. "
                    + DIFFERS_RULE),
        _Block("table", header=cmp.HEADER, rows=cmp.rows()),
        *[_Block("note", note) for note in sheet.notes],
        _Block("h2", f"Findings of sheet {sheet.id}"),
        _Block("p", f"Each finding of the sheet, in our words, decided by the stated test: {verdicts.get('holds', 0)} "
                    f"hold, {verdicts.get('does not hold', 0)} do not hold, {verdicts.get('not testable', 0)} not "
                    f"testable on this run. Orderings are one-sided paired Wilcoxon tests across patients at alpha = "
                    f"{found.alpha} (Holm within a finding): with n patients the smallest one-sided p is 2^-n."),
        _Block("table", header=["id", "finding", "test", "verdict", "detail"],
               rows=[[r["id"], r["finding"], r["test"], r["verdict"], r["detail"]] for _, r in found.frame.iterrows()]),
    ]
    if sheet.id == "068E":
        blocks += _kindling_blocks(first, run.protocol, out_dir)
    return blocks


def _kindling_blocks(df: pd.DataFrame, protocol: dict, out_dir: Path) -> list[_Block]:
    """Sheet 068E's kindling summary per arm and cycle (fact 10) and its figure."""
    from analysis.family.scarring import kindling_summary, plot_kindling
    from analysis.figures import save_figure

    blocks = [_Block("h3", "Kindling per arm and cycle (sheet 068E, fact 10)")]
    try:
        summary = kindling_summary(df, protocol)
    except ValueError as exc:
        return [*blocks, _Block("note", f"Not computed: {exc}")]
    blocks += [
        _Block("p", "Per cycle: the trigger bias, the trigger's biased accuracy (mean ± population SD), the "
                    "patients who relapsed (below 60 %), the scar % after the cycle's episode, and the mean "
                    "severity and activation magnitude of the cycle's state."),
        _Block("table", header=["arm", "cycle", "bias", "n", "biased accuracy %", "relapsed", "scar % after",
                                "severity", "activation"],
               rows=[[display_name(r["arm"]), str(int(r["cycle"])), fmt_num(r["bias"], 1), str(int(r["n"])),
                      f"{fmt_num(r['biased_accuracy'], 1)} ± {fmt_num(r['biased_accuracy_sd'], 1)}",
                      f"{int(r['relapsed'])} ({fmt_num(r['relapse_rate'], 0)} %)",
                      f"{fmt_num(r['scar_after'], 2)} ± {fmt_num(r['scar_after_sd'], 2)}",
                      fmt_num(r["severity"], 2), fmt_num(r["activation_magnitude"], 3)]
                     for _, r in summary.frame.iterrows()]),
    ]
    png, _ = save_figure(plot_kindling(summary), out_dir, "kindling")
    caption = ("Kindling per cycle and arm: the trigger's biased accuracy and the scar % after the episode, "
               "mean ± population SD over patients; dashed: the relapse threshold (60 %).")
    blocks.append(_Block("figure", caption, image=png, name="kindling"))
    return blocks


def _figures_section(run: RunData, df: pd.DataFrame, out_dir: Path) -> list[_Block]:
    from analysis.figures import make_figures

    records = make_figures(df, out_dir, run.protocol, weights_dir=run.weights_dir)
    blocks = [_Block("h2", "Figures")]
    for rec in records:
        if rec.skipped:
            blocks.append(_Block("note", f"Figure `{rec.name}` not drawn: {rec.skipped}."))
        else:
            png = next(p for p in rec.paths if p.suffix == ".png")
            blocks.append(_Block("figure", rec.caption, image=png, name=rec.name))
    return blocks


def write_report(run_dir: str | Path, *, n_resamples: int = 2000, seed: int = 0, cohort_draws: int = 20,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Write ``report.md`` and ``report.html`` (and ``figures/``) into a run folder.

    Parameters
    ----------
    run_dir : str or Path
        A run folder with ``results.csv`` (and normally ``protocol.json`` and
        ``manifest.json``; ``weights/`` is optional).
    n_resamples : int
        Bootstrap resamples for the confidence intervals.
    seed : int
        Seed of every bootstrap (the report is reproducible byte for byte).
    cohort_draws : int
        For a replication (several cohorts of the paper's study): cohorts drawn at each size to find
        the smallest cohort size at which each claim holds in 80 % of them
        (:func:`analysis.replication.smallest_cohort`); 0 leaves it out. Each draw decides every
        claim: the shipped replication's 100 draws (20 at each of 5 sizes) took 42 s.
    progress : callable, optional
        Called with 1 after each drawn cohort, e.g. a progress bar's ``update``.

    Returns
    -------
    Path
        The path of ``report.md``.

    Raises
    ------
    ReportError
        ``results.csv`` is missing or damaged (not a table, missing columns, non-numeric or
        infinite values, no rows), ``protocol.json`` or ``manifest.json`` is not a JSON object,
        the folder cannot be written, or another report is being written into it. Nothing of the
        previous report is changed.

    Examples
    --------
    >>> import tempfile
    >>> from analysis.synthetic import make_results, write_run
    >>> from analysis.report import write_report
    >>> run = write_run(tempfile.mkdtemp(), make_results(n_patients=3))
    >>> write_report(run, n_resamples=199).name
    'report.md'
    """
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    if isinstance(cohort_draws, bool) or not isinstance(cohort_draws, (int, np.integer)) or cohort_draws < 0:
        raise ValueError(f"cohort_draws must be an int >= 0, got {cohort_draws!r}")
    run = load_run(run_dir)
    df = run.results
    with _report_lock(run.path):
        _check_targets(run.path)  # before minutes of statistics, not after
        _remove_stale_tmp(run.path)
        staging = _in_run(run.path, _mkdtemp(run.path, ".figures"))
        try:
            blocks = _header_section(run, df)
            blocks += _sheet_section(run, df, staging)
            if sweep_columns(df):  # the paper's tables pooled over levels would mean nothing
                blocks += _sweep_section(df, staging, n_resamples, seed)
            elif not is_paper_schedule(df):
                blocks += _schedule_section(df, staging)
            else:
                blocks += _replication_section(df, run.protocol, staging, cohort_draws, seed, progress)
                first = df[df["cohort"] == df["cohort"].min()] if "cohort" in df else df
                blocks += _tables_section(first, run.protocol, n_resamples, seed)
                blocks += _claims_section(first, run.protocol)
                blocks += _comparison_blocks(first, n_resamples, seed)
                blocks += _relapse_section(first, run.protocol)
                blocks += _figures_section(run, first, staging)
            blocks.append(
                _Block("p", "Generated by `analysis.report.write_report` from the saved run data.")
            )
            title = blocks[0].text
            md, page = _to_markdown(blocks), _to_html(blocks, title)
            return _commit(run.path, staging, md, page)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- writing


def _in_run(run: Path, *parts: str) -> Path:
    """``run/parts``, or :class:`ReportError` if it would leave the run folder."""
    try:
        return inside(run, *parts)
    except (ValueError, RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
        raise ReportError(f"{run}: refusing to write outside the run folder ({_first_line(exc)})") from None


def _cannot_write(path: Path, exc: OSError) -> ReportError:
    return ReportError(f"{path}: cannot write the report ({exc.strerror or exc})")


class _report_lock:
    """Hold ``flock`` on ``RUN_DIR/.report.lock`` (refused at once if another report holds it)."""

    def __init__(self, run: Path) -> None:
        self.path = _in_run(run, REPORT_LOCK)
        self.run = run
        self.fd: int | None = None

    def __enter__(self) -> None:
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise _cannot_write(self.run, exc) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise ReportError(
                f"{self.run}: another report is being written into this folder ({REPORT_LOCK} is locked); "
                "wait for it to finish"
            ) from None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_targets(run: Path) -> None:
    """Refuse at once a folder whose report files cannot be replaced: report.md or report.html
    that is not a file, figures/ that is not a folder (symbolic links are refused by ``inside``)."""
    for name, is_kind, kind in (("report.md", stat.S_ISREG, "a file"), ("report.html", stat.S_ISREG, "a file"),
                                (FIGURES_DIR, stat.S_ISDIR, "a folder")):
        path = _in_run(run, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _cannot_write(run, exc) from None
        if not is_kind(mode):
            raise ReportError(f"{run}: cannot write the report ({name} is not {kind})")


def _mkdtemp(run: Path, stem: str) -> str:
    try:
        return Path(tempfile.mkdtemp(dir=run, prefix=f"{stem}{_TMP_INFIX}", suffix=_TMP_SUFFIX)).name
    except OSError as exc:
        raise _cannot_write(run, exc) from None


def _remove_stale_tmp(run: Path) -> None:
    """Remove what a killed report left: only names of exactly the report's own temporary form."""
    try:
        names = os.listdir(run)
    except OSError as exc:
        raise _cannot_write(run, exc) from None
    for name in names:
        path = run / name
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if _STALE_FILE.fullmatch(name) and stat.S_ISREG(mode):
            path.unlink(missing_ok=True)
        elif _STALE_DIR.fullmatch(name) and stat.S_ISDIR(mode):
            shutil.rmtree(path, ignore_errors=True)


def _write_tmp(run: Path, name: str, text: str) -> Path:
    """``text`` in a new, flushed temporary file beside ``run/name``; its path."""
    fd, tmp = tempfile.mkstemp(dir=run, prefix=f".{name}{_TMP_INFIX}", suffix=_TMP_SUFFIX)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600 files; a report is an ordinary file
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _commit(run: Path, staging: Path, md: str, page: str) -> Path:
    """Move the finished report into place: figures, then report.html, then report.md.

    Every file is complete before it is renamed, so each output is either the previous one or
    the new one; on failure the temporary files are removed and ``report.md`` is the previous one.
    """
    md_path, html_path = _in_run(run, "report.md"), _in_run(run, "report.html")
    figures = _in_run(run, FIGURES_DIR)
    tmps: list[Path] = []
    try:
        tmps.append(_write_tmp(run, "report.md", md))
        tmps.append(_write_tmp(run, "report.html", page))
        figures.mkdir(exist_ok=True)
        for fig in sorted(staging.iterdir()):
            os.replace(fig, _in_run(run, FIGURES_DIR, fig.name))
        os.replace(tmps[1], html_path)
        os.replace(tmps[0], md_path)
    except OSError as exc:
        raise _cannot_write(run, exc) from None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return md_path
