"""ReviewKD distillation: model zoo, feature taps, ABF, HCL and the distiller."""

from reviewkd.sibling_packages import check_sibling_packages

# Before anything imports deploy or export: a clash with another project's package is named here.
check_sibling_packages()

from reviewkd.abf import ABF, ReviewChain  # noqa: E402 - after the check
from reviewkd.distiller import Distiller, ReviewKD, build_distiller  # noqa: E402 - after the check
from reviewkd.hcl import hcl_loss  # noqa: E402 - after the check
from reviewkd.taps import FeatureTaps, default_taps  # noqa: E402 - after the check

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
