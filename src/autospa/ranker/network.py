"""The class ranker network (L2, pure torch): RELION's architecture and model-file contents.

:class:`ClassRankerNet` is relion-classranker's ``training/model.py`` ``Model`` layer for layer
(reference/relion-schemes-and-ranker.md B7), with the same parameter names, so a RELION 5.0
``model_state_dict`` loads strictly and our weights load in RELION:

- ``cnn_layers``: three blocks of conv 3x3 / ReLU / Dropout / conv 3x3 / ReLU / conv 3x3 stride 2
  (doubling the channels, no ReLU) / Dropout, 16 -> 32 -> 64 -> 128 channels, 64 -> 8 pixels;
- ``feature_extractor``: Linear(8192 -> 48), no activation;
- ``classifier_images_and_features``: Dropout, Linear(72 -> 48), ReLU, Dropout, Linear(48 -> 1)
  on [48 image features, 24 normalised features];
- ``classifier_images`` and ``classifier_features``: unused heads that RELION's checkpoint holds.

The output is an unbounded score ``(B, 1)`` (no sigmoid). :func:`checkpoint_payload` makes the
dict RELION 5.0's ``relion_classranker`` reads (``model_definition`` source defining ``Model``,
``model_state_dict``, hyper-parameters); :func:`model_from_payload` reads it back without executing
the stored source.
"""

from __future__ import annotations

import torch
from torch import nn

from autospa.errors import InputError

#: relion-classranker's widths.
CNN_W = 16
FEAT_EXT_W = 48
FEAT_EXT_W2 = 48
N_FEATURES = 24
IMAGE_SIZE = 64


class ClassRankerNet(nn.Module):
    """RELION's class-ranker CNN.

    Parameters
    ----------
    p_dropout
        Dropout probability (0.3 in training, 0 at inference).
    """

    def __init__(self, p_dropout: float = 0.0) -> None:
        super().__init__()
        w = CNN_W
        layers: list[nn.Module] = []
        for c_in, c in ((1, w), (w * 2, w * 2), (w * 4, w * 4)):
            layers += [
                nn.Conv2d(c_in, c, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True), nn.Dropout(p=p_dropout),
                nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c, c * 2, kernel_size=3, stride=2, padding=1), nn.Dropout(p=p_dropout),
            ]  # fmt: skip
        self.cnn_layers = nn.Sequential(*layers)
        self.feature_extractor = nn.Sequential(nn.Linear(w * 8 * 8 * 8, FEAT_EXT_W))
        self.classifier_images_and_features = nn.Sequential(
            nn.Dropout(p=p_dropout), nn.Linear(FEAT_EXT_W + N_FEATURES, FEAT_EXT_W2), nn.ReLU(inplace=True),
            nn.Dropout(p=p_dropout), nn.Linear(FEAT_EXT_W2, 1),
        )  # fmt: skip
        self.classifier_images = nn.Sequential(nn.Dropout(p=p_dropout), nn.Linear(FEAT_EXT_W, 1))
        self.classifier_features = nn.Sequential(nn.Linear(N_FEATURES, 12), nn.ReLU(inplace=True), nn.Dropout(p=p_dropout), nn.Linear(12, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scores of a batch.

        Parameters
        ----------
        x
            ``(B, 1, 64, 64)`` class-average images.
        y
            ``(B, 24)`` normalised feature vectors.

        Returns
        -------
        torch.Tensor
            ``(B, 1)`` scores.
        """
        z = self.cnn_layers(x)
        z = torch.flatten(z, 1)
        z = self.feature_extractor(z)
        return self.classifier_images_and_features(torch.cat([z, y], 1))


#: Source text stored as ``model_definition`` in checkpoints: RELION 5.0's loader executes it and
#: calls ``Model()``; it defines the same layers as :class:`ClassRankerNet`.
MODEL_DEFINITION = '''import torch
import torch.nn as nn

CNN_W = 16
FEAT_EXT_W = 48
FEAT_EXT_W2 = 48


class Model(nn.Module):
    def __init__(self, p_dropout=0):
        super(Model, self).__init__()
        w = CNN_W
        layers = []
        for c_in, c in ((1, w), (w * 2, w * 2), (w * 4, w * 4)):
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True), nn.Dropout(p=p_dropout),
                       nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c * 2, kernel_size=3, stride=2, padding=1), nn.Dropout(p=p_dropout)]
        self.cnn_layers = nn.Sequential(*layers)
        self.feature_extractor = nn.Sequential(nn.Linear(w * 8 * 8 * 8, FEAT_EXT_W))
        self.classifier_images_and_features = nn.Sequential(
            nn.Dropout(p=p_dropout), nn.Linear(FEAT_EXT_W + 24, FEAT_EXT_W2), nn.ReLU(inplace=True),
            nn.Dropout(p=p_dropout), nn.Linear(FEAT_EXT_W2, 1))
        self.classifier_images = nn.Sequential(nn.Dropout(p=p_dropout), nn.Linear(FEAT_EXT_W, 1))
        self.classifier_features = nn.Sequential(nn.Linear(24, 12), nn.ReLU(inplace=True), nn.Dropout(p=p_dropout),
                                                 nn.Linear(12, 1))

    def forward(self, x, y):
        x = self.cnn_layers(x)
        x = torch.flatten(x, 1)
        x = self.feature_extractor(x)
        return self.classifier_images_and_features(torch.cat([x, y], 1))
'''


def checkpoint_payload(model: nn.Module, **extra: object) -> dict:
    """The dict of a RELION 5.0 class-ranker checkpoint (``torch.save`` it).

    Parameters
    ----------
    model
        A :class:`ClassRankerNet` (or any module with its state_dict keys).
    **extra
        More entries (hyper-parameters, our calibrated threshold, training report).
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"model_definition": MODEL_DEFINITION, "model_state_dict": state, **extra}


def model_from_payload(payload: dict, source: str = "model") -> ClassRankerNet:
    """A :class:`ClassRankerNet` in eval mode from a checkpoint dict (the stored source is not
    executed: the state_dict is loaded strictly into our own definition).

    Raises
    ------
    InputError
        The state_dict does not fit the architecture.
    """
    model = ClassRankerNet(p_dropout=0.0)
    state = payload.get("model_state_dict")
    if not isinstance(state, dict):
        raise InputError(source, "checkpoint has no model_state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise InputError(source, f"weights do not fit RELION's class-ranker architecture ({' '.join(first[:2])[:300]})") from exc
    return model.eval()


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor, features: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scores of classes (eval mode, no gradients; the device follows the model's parameters).

    Parameters
    ----------
    model
        :class:`ClassRankerNet` or a TorchScript module taking ``(images, features)``.
    images
        ``(n, 64, 64)`` or ``(n, 1, 64, 64)``.
    features
        ``(n, 24)`` normalised features.

    Returns
    -------
    torch.Tensor
        ``(n,)`` float32 scores on the CPU.
    """
    if images.ndim == 3:
        images = images[:, None]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        s = model(images[i : i + batch_size].to(device, torch.float32), features[i : i + batch_size].to(device, torch.float32))
        out.append(s.reshape(-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


__all__ = ["ClassRankerNet", "MODEL_DEFINITION", "checkpoint_payload", "model_from_payload", "predict_scores"]
