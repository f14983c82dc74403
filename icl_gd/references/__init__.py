"""Reference algorithms (docs/science.md sections 4, 6 and 8) as a registry: `registry` holds the
protocol, `regression` the GD / GD++ / OLS / ridge references of regression tasks (and their
numerics, re-exported here), `lds` the per-position references of linear dynamical systems,
`solvers` the truncated iterative solvers of normal equations that `lds` and `icl_gd.explain` share."""

from icl_gd.linalg import spd_solve
from icl_gd.references import lds, regression, solvers  # noqa: F401  (lds and regression register the references)
from icl_gd.references.registry import REGISTRY, FitContext, Reference, analytic, for_task, register
from icl_gd.references.regression import (
    GDPP,
    GDReference,
    RidgeSpectrum,
    bayes_ridge_lambda,
    closed_form,
    closed_form_gd,
    fit_gdpp,
    gd_direct,
    gd_loss,
    gd_weights,
    gdpp_direct,
    gdpp_starts,
    gdpp_weights,
    line_search_eta,
    loss,
    minimize_scalar,
    precond_gd_direct,
    ridge_from_spectrum,
    ridge_predict,
    ridge_spectrum,
)

__all__ = [
    "GDPP",
    "REGISTRY",
    "FitContext",
    "GDReference",
    "Reference",
    "RidgeSpectrum",
    "analytic",
    "bayes_ridge_lambda",
    "closed_form",
    "closed_form_gd",
    "fit_gdpp",
    "for_task",
    "gd_direct",
    "gd_loss",
    "gd_weights",
    "gdpp_direct",
    "gdpp_starts",
    "gdpp_weights",
    "line_search_eta",
    "loss",
    "minimize_scalar",
    "precond_gd_direct",
    "register",
    "ridge_from_spectrum",
    "ridge_predict",
    "ridge_spectrum",
    "spd_solve",
]
