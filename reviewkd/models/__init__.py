"""The model zoo: `create_model(name, num_classes, weights=None)`, `load_weights`, `list_models`.

Our own networks carry `default_feature_taps`: the module paths of each stage's output followed by
"avgpool" (the globally pooled feature), each module called exactly once per forward.
"""

from .cifar100_nets import CifarResNetB, WideResNet
from .cifar_resnet import CifarResNet
from .weights import load_weights, read_state_dict
from .zoo import check_model_name, create_model, list_models

__all__ = [
    "CifarResNet",
    "CifarResNetB",
    "WideResNet",
    "check_model_name",
    "create_model",
    "list_models",
    "load_weights",
    "read_state_dict",
]
