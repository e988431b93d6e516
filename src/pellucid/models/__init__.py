"""Model zoo, model cards, saving/loading and training."""

from pellucid.models.card import ModelCard
from pellucid.models.store import LoadedModel, load_model, save_model
from pellucid.models.train import TrainConfig, TrainResult, evaluate_model, predict, train
from pellucid.models.zoo import ARCHS, build

__all__ = [
    "ARCHS", "LoadedModel", "ModelCard", "TrainConfig", "TrainResult", "build", "evaluate_model",
    "load_model", "predict", "save_model", "train",
]
