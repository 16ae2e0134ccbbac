"""ReviewKD distillation: model zoo, feature taps, ABF, HCL and the distiller.

The names below load on first use (PEP 562): the `reviewkd` command line lives in this package,
and its serving commands must start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reviewkd.sibling_packages import check_sibling_packages

# Before anything imports deploy or export: a clash with another project's package is named here.
check_sibling_packages()

if TYPE_CHECKING:
    from reviewkd.abf import ABF, ReviewChain
    from reviewkd.distiller import Distiller, ReviewKD, build_distiller
    from reviewkd.hcl import hcl_loss
    from reviewkd.taps import FeatureTaps, default_taps

# Public name -> the module that defines it.
_EXPORTS = {
    "ABF": "reviewkd.abf",
    "ReviewChain": "reviewkd.abf",
    "Distiller": "reviewkd.distiller",
    "ReviewKD": "reviewkd.distiller",
    "build_distiller": "reviewkd.distiller",
    "hcl_loss": "reviewkd.hcl",
    "FeatureTaps": "reviewkd.taps",
    "default_taps": "reviewkd.taps",
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reviewkd' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
