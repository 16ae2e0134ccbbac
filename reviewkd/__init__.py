"""ReviewKD distillation: model zoo, feature taps, ABF, HCL and the distiller."""

from reviewkd.abf import ABF, ReviewChain
from reviewkd.distiller import Distiller, ReviewKD, build_distiller
from reviewkd.hcl import hcl_loss
from reviewkd.taps import FeatureTaps, default_taps

__all__ = [
    "ABF",
    "Distiller",
    "FeatureTaps",
    "ReviewChain",
    "ReviewKD",
    "build_distiller",
    "default_taps",
    "hcl_loss",
]
