"""Models of the longitudinal phase: relapse after wash-out and the wash-out accuracy.

- :func:`relapse_gee`: ``relapsed ~ arm + maintenance duration`` as a binomial
  GEE (logit link) clustered by patient, with robust standard errors.
- :func:`washout_mixedlm`: post-wash-out biased-noise accuracy ``~ arm x
  duration`` with a random intercept per patient (``statsmodels`` MixedLM).

Both check the data before fitting and say in the output what they could
not estimate (an arm that never or always relapses has infinite log-odds -
complete separation - and is left out of the GEE with a note) instead of
printing nonsense numbers.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from analysis._data import arm_order, check_results
from analysis._results import ResultsBase, frame_to_text

__all__ = ["LongitudinalModel", "relapse_gee", "washout_mixedlm"]

#: Coefficients beyond this absolute size (log-odds) signal quasi-separation.
SEPARATION_COEF = 15.0


class LongitudinalModel(ResultsBase):
    """A fitted (or not fittable) longitudinal model.

    Attributes
    ----------
    name : str
        ``"relapse_gee"`` or ``"washout_mixedlm"``.
    formula : str
        Model formula in readable form.
    fitted : bool
        False when the model could not be fitted; ``message`` says why.
    message : str
        Why the model was not fitted ("" when fitted).
    notes : list of str
        What was left out or is doubtful (separation, convergence, boundary).
    params : pandas.DataFrame
        ``term, coef, std_err, z, pvalue, conf_int_low, conf_int_high`` and,
        for the GEE, ``odds_ratio, or_conf_int_low, or_conf_int_high``.
        Empty when not fitted.
    n_obs, n_groups : int
        Observations and patients used.
    extra : dict
        Model-specific numbers (GEE: working correlation; MixedLM: random
        intercept variance, residual variance, converged flag).
    model_result : object or None
        The statsmodels results object.
    """

    def __init__(
        self,
        name: str,
        formula: str,
        *,
        fitted: bool,
        message: str = "",
        notes: list[str] | None = None,
        params: pd.DataFrame | None = None,
        n_obs: int = 0,
        n_groups: int = 0,
        extra: Mapping | None = None,
        model_result: object = None,
    ) -> None:
        self.name = name
        self.formula = formula
        self.fitted = fitted
        self.message = message
        self.notes = list(notes or [])
        self.params = params if params is not None else pd.DataFrame()
        self.n_obs = n_obs
        self.n_groups = n_groups
        self.extra = dict(extra or {})
        self.model_result = model_result

    def summary_frame(self) -> pd.DataFrame:
        """The coefficient table (empty when the model was not fitted)."""
        return self.params.copy()

    def summary(self) -> str:
        """Paper-style text: the model, its coefficients, and what could not be estimated."""
        titles = {
            "relapse_gee": "Relapse after wash-out: binomial GEE (logit), clustered by patient",
            "washout_mixedlm": "Post-wash-out biased-noise accuracy: linear mixed model, "
            "random intercept per patient",
        }
        lines = [titles.get(self.name, self.name), f"Model: {self.formula}"]
        if not self.fitted:
            lines.append(f"NOT FITTED: {self.message}")
        else:
            lines.append(f"Observations: {self.n_obs}; patients: {self.n_groups}")
            for key, value in self.extra.items():
                lines.append(
                    f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}"
                )
            lines.append(frame_to_text(self.params, 3))
        for note in self.notes:
            lines.append(f"Note: {note}")
        return "\n".join(lines)


def _term_name(term: str) -> str:
    term = re.sub(r"C\(arm, Treatment\(reference='[^']*'\)\)\[T\.([^\]]+)\]", r"arm[\1]", term)
    term = term.replace("Group Var", "patient intercept variance")
    return term


def _param_frame(res, *, logit: bool) -> pd.DataFrame:
    ci = res.conf_int()
    names = [n for n in res.params.index if n in res.bse.index]
    frame = pd.DataFrame(
        {
            "term": [_term_name(n) for n in names],
            "coef": res.params[names].to_numpy(dtype=float),
            "std_err": res.bse[names].to_numpy(dtype=float),
            "z": res.tvalues[names].to_numpy(dtype=float),
            "pvalue": res.pvalues[names].to_numpy(dtype=float),
            "conf_int_low": ci.loc[names].iloc[:, 0].to_numpy(dtype=float),
            "conf_int_high": ci.loc[names].iloc[:, 1].to_numpy(dtype=float),
        }
    )
    if logit:
        with np.errstate(over="ignore"):
            frame["odds_ratio"] = np.exp(frame["coef"])
            frame["or_conf_int_low"] = np.exp(frame["conf_int_low"])
            frame["or_conf_int_high"] = np.exp(frame["conf_int_high"])
    return frame


def _check_reference(reference: str | None, arms: list[str]) -> str:
    if reference is None:
        return arms[0]
    if not isinstance(reference, str):
        raise TypeError(f"reference must be an arm name, got {type(reference).__name__}")
    if reference not in arms:
        raise ValueError(f"reference arm {reference!r} not among the modelled arms {arms}")
    return reference


def _check_scale(duration_scale: float) -> float:
    if not isinstance(duration_scale, (int, float)) or isinstance(duration_scale, bool):
        raise TypeError("duration_scale must be a number")
    if not duration_scale > 0:
        raise ValueError(f"duration_scale must be > 0, got {duration_scale}")
    return float(duration_scale)


def relapse_gee(
    results: pd.DataFrame,
    *,
    reference: str | None = None,
    duration_scale: float = 100.0,
    cov_struct: str = "exchangeable",
) -> LongitudinalModel:
    """Relapse ~ arm + maintenance duration, binomial GEE clustered by patient.

    Uses the ``relapsed`` rows of the ``washout`` phase (one per patient x arm
    x maintenance duration).  An arm in which nobody or everybody relapsed
    has no finite log-odds (complete separation); it is left out of the
    model and named in ``notes``.  If fewer than one arm with both outcomes
    remains, the model is not fitted and ``message`` says why.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    reference : str, optional
        Reference arm of the arm contrasts (default: the first modelled arm in
        paper order).
    duration_scale : float
        Duration is entered per this many epochs (default 100).
    cov_struct : {"exchangeable", "independence"}
        Working correlation within a patient.  Exchangeable falls back to
        independence (with a note) if it cannot be estimated.

    Returns
    -------
    LongitudinalModel
        Coefficients on the log-odds scale with odds ratios; robust
        (sandwich) standard errors.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.longitudinal import relapse_gee
    >>> m = relapse_gee(make_results(n_patients=6, seed=0))
    >>> m.notes[0].startswith("ketamine left out")
    True
    """
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    df = check_results(results)
    scale = _check_scale(duration_scale)
    if cov_struct not in ("exchangeable", "independence"):
        raise ValueError(
            f"cov_struct must be 'exchangeable' or 'independence', got {cov_struct!r}"
        )
    rel = df[(df["phase"] == "washout") & (df["metric"] == "relapsed")]
    formula_text = f"logit P(relapse) ~ arm + duration (per {scale:g} epochs)"
    if rel.empty:
        raise ValueError("results have no wash-out 'relapsed' rows")
    data = pd.DataFrame(
        {
            "patient": rel["patient"].to_numpy(),
            "arm": rel["arm"].to_numpy(dtype=object),
            "duration": rel["maintenance_epochs"].to_numpy(dtype=float) / scale,
            "relapsed": rel["value"].to_numpy(dtype=float),
        }
    )
    notes: list[str] = []
    keep = []
    for arm in [a for a in arm_order(df) if a in set(data["arm"])]:
        y = data.loc[data["arm"] == arm, "relapsed"]
        k, n = int(y.sum()), len(y)
        if k == 0 or k == n:
            what = "never relapsed" if k == 0 else "always relapsed"
            notes.append(
                f"{arm} left out: {what} ({k}/{n} patient x duration); "
                "its log-odds are infinite (complete separation), so no odds ratio is estimable"
            )
        else:
            keep.append(arm)
    if not keep:
        return LongitudinalModel(
            "relapse_gee",
            formula_text,
            fitted=False,
            notes=notes,
            message="no arm has both relapses and non-relapses; nothing to model",
        )
    data = data[data["arm"].isin(keep)].reset_index(drop=True)
    data["arm"] = pd.Categorical(data["arm"], categories=keep)
    ref = _check_reference(reference, keep)
    terms = []
    if len(keep) > 1:
        terms.append(f"C(arm, Treatment(reference='{ref}'))")
    else:
        notes.append(f"only {keep[0]} has both outcomes: no arm contrast is estimable")
    if data["duration"].nunique() > 1:
        terms.append("duration")
    formula = "relapsed ~ " + (" + ".join(terms) if terms else "1")
    if len(keep) > 1:
        formula_text = (
            f"logit P(relapse) ~ arm (reference {ref}) + duration (per {scale:g} epochs)"
        )
    structs = ["exchangeable", "independence"] if cov_struct == "exchangeable" else [cov_struct]
    res = None
    for struct in structs:
        cs = (
            sm.cov_struct.Exchangeable()
            if struct == "exchangeable"
            else sm.cov_struct.Independence()
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = smf.gee(
                    formula,
                    groups="patient",
                    data=data,
                    family=sm.families.Binomial(),
                    cov_struct=cs,
                )
                res = model.fit(maxiter=200)
                params = res.params.to_numpy(dtype=float)
                bse = res.bse.to_numpy(dtype=float)
            except Exception as exc:  # statsmodels raises several types here
                res = None
                notes.append(f"{struct} working correlation failed: {exc}")
                continue
        if np.all(np.isfinite(params)) and np.all(np.isfinite(bse)):
            for w in caught:
                msg = str(w.message)
                if "converge" in msg.lower() or "separation" in msg.lower():
                    notes.append(f"statsmodels warned: {msg}")
            if struct != cov_struct:
                notes.append("exchangeable working correlation not estimable; used independence")
            break
        notes.append(f"{struct} working correlation gave non-finite estimates")
        res = None
    if res is None:
        return LongitudinalModel(
            "relapse_gee",
            formula_text,
            fitted=False,
            notes=notes,
            message="the GEE could not be fitted with finite estimates",
        )
    frame = _param_frame(res, logit=True)
    big = frame.loc[frame["coef"].abs() > SEPARATION_COEF, "term"].tolist()
    if big:
        return LongitudinalModel(
            "relapse_gee",
            formula_text,
            fitted=False,
            notes=notes,
            message=f"quasi-complete separation: |log-odds| > {SEPARATION_COEF:g} for {big}; "
            "the estimates are not meaningful",
        )
    extra = {}
    if hasattr(res.model.cov_struct, "dep_params"):
        dep = res.model.cov_struct.dep_params
        if dep is not None and np.ndim(dep) == 0 and math.isfinite(float(dep)):
            extra["working correlation"] = float(dep)
    return LongitudinalModel(
        "relapse_gee",
        formula_text,
        fitted=True,
        notes=notes,
        params=frame,
        n_obs=len(data),
        n_groups=int(data["patient"].nunique()),
        extra=extra,
        model_result=res,
    )


def washout_mixedlm(
    results: pd.DataFrame,
    *,
    reference: str | None = None,
    duration_scale: float = 100.0,
) -> LongitudinalModel:
    """Post-wash-out biased accuracy ~ arm x duration, random intercept per patient.

    Uses the ``washout`` biased-noise ``accuracy`` at each trajectory's last
    step (one value per patient x arm x maintenance duration), fitted by
    REML with ``statsmodels.formula.api.mixedlm``.  Convergence warnings and
    a random-intercept variance on the boundary (zero) are reported in
    ``notes``.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    reference : str, optional
        Reference arm (default: the first treated arm in paper order).
    duration_scale : float
        Duration is entered per this many epochs (default 100).

    Returns
    -------
    LongitudinalModel
        Fixed effects in percentage points; ``extra`` holds the random
        intercept variance, residual variance and convergence flag.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.longitudinal import washout_mixedlm
    >>> m = washout_mixedlm(make_results(n_patients=6, seed=0))
    >>> m.fitted, m.params["term"].iloc[1]
    (True, 'arm[ssri]')
    """
    import statsmodels.formula.api as smf

    df = check_results(results)
    scale = _check_scale(duration_scale)
    rows = df[
        (df["phase"] == "washout") & (df["metric"] == "accuracy") & (df["condition"] == "biased")
    ]
    if rows.empty:
        raise ValueError("results have no wash-out biased-noise accuracy rows")
    last = rows.groupby("arm")["step"].transform("max")
    rows = rows[(rows["step"] == last) | rows["step"].isna()]
    data = pd.DataFrame(
        {
            "patient": rows["patient"].to_numpy(),
            "arm": rows["arm"].to_numpy(dtype=object),
            "duration": rows["maintenance_epochs"].to_numpy(dtype=float) / scale,
            "accuracy": rows["value"].to_numpy(dtype=float),
        }
    ).reset_index(drop=True)
    arms = [a for a in arm_order(df) if a in set(data["arm"])]
    data["arm"] = pd.Categorical(data["arm"], categories=arms)
    ref = _check_reference(reference, arms)
    terms = []
    if len(arms) > 1:
        terms.append(f"C(arm, Treatment(reference='{ref}'))")
    if data["duration"].nunique() > 1:
        terms.append("duration")
    rhs = " * ".join(terms) if terms else "1"
    formula = f"accuracy ~ {rhs}"
    formula_text = (
        f"accuracy ~ arm (reference {ref}) x duration (per {scale:g} epochs) + (1 | patient)"
    )
    notes: list[str] = []
    n_groups = int(data["patient"].nunique())
    if n_groups < 2:
        return LongitudinalModel(
            "washout_mixedlm",
            formula_text,
            fitted=False,
            message="needs at least two patients for a random intercept",
        )
    if np.ptp(data["accuracy"].to_numpy()) == 0.0:
        return LongitudinalModel(
            "washout_mixedlm",
            formula_text,
            fitted=False,
            message="the accuracy is identical in every observation; nothing to model",
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = smf.mixedlm(formula, data, groups=data["patient"]).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as exc:
            return LongitudinalModel(
                "washout_mixedlm",
                formula_text,
                fitted=False,
                message=f"MixedLM failed: {exc}",
            )
    for w in caught:
        msg = str(w.message).strip().splitlines()[0]
        if msg and f"statsmodels warned: {msg}" not in notes:
            notes.append(f"statsmodels warned: {msg}")
    frame = _param_frame(res, logit=False)
    frame = frame[frame["term"] != "patient intercept variance"].reset_index(drop=True)
    re_var = float(np.asarray(res.cov_re)[0, 0])
    if re_var < 1e-8 * max(1.0, float(res.scale)):
        notes.append(
            "random-intercept variance is on the boundary (0): no between-patient "
            "variation beyond the fixed effects"
        )
    if not np.all(np.isfinite(frame[["coef", "std_err"]].to_numpy())):
        return LongitudinalModel(
            "washout_mixedlm",
            formula_text,
            fitted=False,
            notes=notes,
            message="non-finite estimates (singular design, e.g. a constant arm)",
        )
    extra = {
        "random-intercept variance": re_var,
        "residual variance": float(res.scale),
        "converged": bool(res.converged),
    }
    return LongitudinalModel(
        "washout_mixedlm",
        formula_text,
        fitted=True,
        notes=notes,
        params=frame,
        n_obs=len(data),
        n_groups=n_groups,
        extra=extra,
        model_result=res,
    )

