"""Task kinds as a registry (`task=linear`, `task=sine`, `task=lds`): each module registers one
kind that samples `Batch`es of token sequences on device (docs/science.md sections 1, 2 and 8)."""

from icl_gd.tasks import lds, linear, sine  # noqa: F401  (registers the kinds)
from icl_gd.tasks.base import REGISTRY, Batch, Layout, Mask, TaskKind, draw, from_config, register, sample
from icl_gd.tasks.linear import InputLaw, LinearRegression, input_law, sample_inputs, sample_linear
from icl_gd.tasks.regression import Regression, Tasks
from icl_gd.tasks.sine import sample_sine

__all__ = [
    "REGISTRY",
    "Batch",
    "InputLaw",
    "Layout",
    "LinearRegression",
    "Mask",
    "Regression",
    "TaskKind",
    "Tasks",
    "draw",
    "from_config",
    "input_law",
    "register",
    "sample",
    "sample_inputs",
    "sample_linear",
    "sample_sine",
]
