"""Model factories used by the ``module:factory`` loading tests."""

from pellucid.models import build


def tiny_resnet():
    return build("resnet18", 2, 1, 2).module
