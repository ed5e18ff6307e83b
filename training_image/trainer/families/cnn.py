"""`cnn`: a small PyTorch convolutional network over features that form an image.

- The features are one image, row-major (`image_shape`, e.g. `8,8` for the 64 pixels
  of scikit-learn's digits). The ONNX model takes the usual `input` [N, n_features]
  and reshapes and scales (`input_scale`) inside the graph, so a device feeds raw
  features as for every other family.
- Layers, named as the warm start and `frozen_layers` know them: `conv1..convN`
  (3x3 convolution, ReLU, 2x2 max-pool while the image is at least 2x2), `dense`
  (ReLU) and `head` (one output per class). `scores` are the softmax
  probabilities, `label` their argmax; metrics `accuracy` and `macro_f1` on the holdout.
- Trained on CUDA when the container sees a GPU (`device=auto`) and on CPU otherwise;
  the device used is recorded in metrics.json (`model.device`). Deterministic for a
  given seed and device: seeded generators, deterministic algorithms (cuBLAS
  workspace config set before CUDA starts), no cuDNN autotuning.
- Warm start: when the champion is a `cnn` with the same architecture, its ONNX
  initializers (named after the layers' parameters) become the starting weights and
  the run fine-tunes (`fine_tune_learning_rate`, `fine_tune_epochs`, optionally
  `frozen_layers` kept exactly as the champion has them, so their bytes do not change
  and the delta shrinks). Otherwise it trains from scratch and metrics.json says why.
  The gate judges either on the same holdout.

PyTorch is an optional dependency (`mledge-trainer[cnn]`): this module is imported only
when a run asks for the `cnn` family.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import torch
from mledge_update import onnx_metadata
from mledge_update.families import CNN
from torch import nn

from trainer.data import Split
from trainer.errors import DataError, ExportError, HyperparameterError
from trainer.families.base import FittedModel, ModelFamily
from trainer.families.classifier import classification_metrics
from trainer.hyperparameters import CommonParams, Hyperparameters

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "sgd")
ARCHITECTURE_KEY = onnx_metadata.CNN_ARCHITECTURE
# ONNX initializer names are the wrapped network's parameter names under this prefix.
_PARAM_PREFIX = "net."
# cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
_CUBLAS_WORKSPACE = ":4096:8"


@dataclass(frozen=True)
class Architecture:
    """What fixes the shapes of the weights: a champion warm-starts only an equal one."""

    image_shape: tuple[int, int]
    channels: tuple[int, ...]
    dense_units: int
    classes: int
    input_scale: float

    def layer_names(self) -> tuple[str, ...]:
        return (*(f"conv{i + 1}" for i in range(len(self.channels))), "dense", "head")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class CnnParams:
    architecture: Architecture
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    optimizer: str
    device: str
    warm_start: bool
    fine_tune_learning_rate: float
    fine_tune_epochs: int
    frozen_layers: tuple[str, ...]
    update_fraction: float


class ConvNet(nn.Module):
    """conv1..convN (+ReLU, 2x2 max-pool while the image allows), dense (+ReLU), head."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.image_shape = arch.image_shape
        self.input_scale = arch.input_scale
        height, width = arch.image_shape
        self.pool: list[bool] = []
        in_channels = 1
        for i, out_channels in enumerate(arch.channels):
            self.add_module(f"conv{i + 1}", nn.Conv2d(in_channels, out_channels, 3, padding=1))
            pool = height >= 2 and width >= 2
            self.pool.append(pool)
            if pool:
                height, width = height // 2, width // 2
            in_channels = out_channels
        self.dense = nn.Linear(in_channels * height * width, arch.dense_units)
        self.head = nn.Linear(arch.dense_units, arch.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits
        h = x.reshape(-1, 1, *self.image_shape) * (1.0 / self.input_scale)
        for i, pool in enumerate(self.pool):
            h = torch.relu(getattr(self, f"conv{i + 1}")(h))
            if pool:
                h = torch.max_pool2d(h, 2)
        return self.head(torch.relu(self.dense(h.flatten(1))))


class _Exported(nn.Module):
    """The ONNX graph: `input` [N, n_features] -> `label` int64 [N], `scores` float32 [N, k]."""

    def __init__(self, net: ConvNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(self.net(input), dim=1)
        return torch.argmax(scores, dim=1), scores


def _image_shape(hp: Hyperparameters, n_features: int) -> tuple[int, int]:
    side = math.isqrt(n_features)
    default = (side, side) if side * side == n_features else None
    shape = hp.int_tuple("image_shape", default, minimum=1, maximum=4096, max_items=2)
    if shape is None:
        raise HyperparameterError(
            f"hyperparameter 'image_shape': required ({n_features} features are not a square "
            "image); give height,width")
    if len(shape) != 2 or shape[0] * shape[1] != n_features:
        raise HyperparameterError(
            f"hyperparameter 'image_shape': height,width must multiply to the {n_features} "
            f"features, got {','.join(map(str, shape))}")
    return shape[0], shape[1]


def _frozen_layers(hp: Hyperparameters, arch: Architecture) -> tuple[str, ...]:
    raw = hp.string("frozen_layers", "")
    names = tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))
    known = arch.layer_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise HyperparameterError(
            f"hyperparameter 'frozen_layers': unknown layer(s) {', '.join(unknown)} "
            f"(layers: {', '.join(known)})")
    if set(names) == set(known):
        raise HyperparameterError(
            "hyperparameter 'frozen_layers': freezing every layer leaves nothing to train")
    return names


def select_device(requested: str) -> torch.device:
    """`auto`: CUDA when the container sees a GPU, else CPU; `cuda` without one is an error."""
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise HyperparameterError(
            f"hyperparameter 'device': 'cuda' but no CUDA device is visible "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    if requested == "cpu" or not available:
        return torch.device("cpu")
    return torch.device("cuda")


def _make_deterministic(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def champion_weights(champion_model: bytes | None, arch: Architecture
                     ) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The champion's weights as a state dict, or None and the reason they cannot be used."""
    if champion_model is None:
        return None, "no champion"
    try:
        model = onnx.load_from_string(champion_model)
    except Exception as exc:  # protobuf raises DecodeError and others
        return None, f"champion is not a readable ONNX model ({type(exc).__name__})"
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(onnx_metadata.FAMILY) != CnnFamily.name:
        return None, f"champion family is {meta.get(onnx_metadata.FAMILY)!r}, not 'cnn'"
    if meta.get(ARCHITECTURE_KEY) != arch.to_json():
        return None, "champion architecture differs (image shape, channels, units or classes)"
    initializers = {t.name: t for t in model.graph.initializer}
    expected = ConvNet(arch).state_dict()
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in expected.items():
        found = initializers.get(_PARAM_PREFIX + key)
        if found is None:
            return None, f"champion lacks the weights {key}"
        array = onnx.numpy_helper.to_array(found)
        if tuple(array.shape) != tuple(tensor.shape) or not np.all(np.isfinite(array)):
            return None, f"champion weights {key} have the wrong shape or non-finite values"
        weights[key] = torch.from_numpy(np.array(array, dtype=np.float32))
    return weights, "warm-started from the champion"


def _train(net: ConvNet, params: CnnParams, learning_rate: float, epochs: int,
           x: torch.Tensor, y: torch.Tensor, order: torch.Generator,
           after_step: _Pin | None = None, w: torch.Tensor | None = None) -> float:
    """Minibatch training of the trainable parameters; returns the last epoch's mean loss.

    `w`: per-record weights (1 / inclusion probability, trainer.data); each batch's loss
    is then the weighted mean. None takes the plain mean, bit for bit as before weights."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if params.optimizer == "adam":
        optimizer = torch.optim.Adam(trainable, lr=learning_rate,
                                     weight_decay=params.weight_decay)
    else:
        optimizer = torch.optim.SGD(trainable, lr=learning_rate, momentum=0.9,
                                    weight_decay=params.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    per_record = nn.CrossEntropyLoss(reduction="none")
    net.train()
    epoch_loss = float("nan")
    for _ in range(epochs):
        permutation = torch.randperm(len(x), generator=order).to(x.device)
        total = 0.0
        for start in range(0, len(x), params.batch_size):
            batch = permutation[start:start + params.batch_size]
            optimizer.zero_grad(set_to_none=True)
            if w is None:
                loss = loss_fn(net(x[batch]), y[batch])
            else:
                bw = w[batch]
                loss = (per_record(net(x[batch]), y[batch]) * bw).sum() / bw.sum()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(batch)
        epoch_loss = total / len(x)
    return epoch_loss


def _largest_changes(net: ConvNet, champion: dict[str, torch.Tensor], fraction: float
                     ) -> dict[str, torch.Tensor]:
    """Per trainable tensor, True where the change from the champion is among the largest
    `fraction` of all changes (measured relative to the tensor's RMS, so that layers
    of small weights are not starved)."""
    relative: dict[str, torch.Tensor] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        old = champion[name].to(p.device)
        scale = old.pow(2).mean().sqrt().clamp_min(1e-12)
        relative[name] = ((p.detach() - old).abs() / scale).flatten()
    everything = torch.cat(list(relative.values()))
    keep = max(1, round(fraction * everything.numel()))
    threshold = torch.topk(everything, keep, sorted=True).values[-1]
    return {name: (r >= threshold).reshape(dict(net.named_parameters())[name].shape)
            for name, r in relative.items()}


class _Pin:
    """After each optimizer step, put the weights outside the masks back to the champion's."""

    def __init__(self, net: ConvNet, champion: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor]) -> None:
        named = dict(net.named_parameters())
        self.pinned = [(named[n], champion[n].to(named[n].device), m) for n, m in masks.items()]

    @torch.no_grad()
    def __call__(self) -> None:
        for param, old, mask in self.pinned:
            param.copy_(torch.where(mask, param, old))

    def fraction_changed(self) -> float:
        changed = sum(int((p != old).sum()) for p, old, _ in self.pinned)
        return changed / max(1, sum(p.numel() for p, _, _ in self.pinned))


class CnnFamily(ModelFamily):
    name: ClassVar[str] = CNN
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    needs_labels: ClassVar[bool] = True

    def parse_params(self, hp: Hyperparameters, common: CommonParams) -> CnnParams:
        if common.label_mode == "none":
            raise HyperparameterError(
                "hyperparameter 'label_mode': the cnn family needs labels; "
                "use 'required' or 'optional', got 'none'")
        arch = Architecture(
            image_shape=_image_shape(hp, len(common.features)),
            channels=hp.int_tuple("channels", (16, 32), minimum=1, maximum=1024, max_items=8),
            dense_units=hp.integer("dense_units", 64, minimum=1, maximum=65_536),
            classes=hp.integer("classes", 10, minimum=2, maximum=100_000),
            input_scale=hp.number("input_scale", 1.0, minimum=0.0, exclusive=True),
        )
        learning_rate = hp.number("learning_rate", 1e-3, minimum=0.0, maximum=10.0,
                                  exclusive=True)
        epochs = hp.integer("epochs", 30, minimum=1, maximum=100_000)
        return CnnParams(
            architecture=arch,
            epochs=epochs,
            batch_size=hp.integer("batch_size", 64, minimum=1, maximum=1_000_000),
            learning_rate=learning_rate,
            weight_decay=hp.number("weight_decay", 0.0, minimum=0.0, maximum=1.0),
            optimizer=hp.string("optimizer", "adam", choices=OPTIMIZERS),
            device=hp.string("device", "auto", choices=DEVICES),
            warm_start=hp.boolean("warm_start", True),
            fine_tune_learning_rate=hp.number("fine_tune_learning_rate", learning_rate / 10,
                                              minimum=0.0, maximum=10.0, exclusive=True),
            fine_tune_epochs=hp.integer("fine_tune_epochs", epochs, minimum=1,
                                        maximum=100_000),
            frozen_layers=_frozen_layers(hp, arch),
            update_fraction=hp.number("update_fraction", 1.0, minimum=0.0, maximum=1.0,
                                      exclusive=False),
        )

    def check_data(self, params: CnnParams, train: Split, holdout: Split) -> None:
        assert train.labels is not None and holdout.labels is not None
        classes = params.architecture.classes
        for split, labels in (("training", train.labels), ("holdout", holdout.labels)):
            outside = labels[(labels < 0) | (labels >= classes)]
            if len(outside):
                raise DataError(
                    f"{len(outside)} {split} record(s) have labels outside 0..{classes - 1} "
                    f"(e.g. {int(outside[0])}); raise the 'classes' hyperparameter")
        if len(np.unique(train.labels)) < 2:
            raise DataError("too little data: the training records hold fewer than 2 classes; "
                            "a classifier needs at least 2")
        if len(holdout) < 1:
            raise DataError("too little data: no record fell into the holdout")

    def fit(self, params: CnnParams, common: CommonParams, train: Split,
            champion_model: bytes | None = None) -> FittedModel:
        assert train.labels is not None
        device = select_device(params.device)
        _make_deterministic(common.seed)
        arch = params.architecture
        net = ConvNet(arch)
        weights, warm_reason = (champion_weights(champion_model, arch) if params.warm_start
                                else (None, "warm_start is false"))
        frozen: tuple[str, ...] = ()
        if weights is not None:
            net.load_state_dict(weights)
            frozen = params.frozen_layers
            for layer in frozen:
                getattr(net, layer).requires_grad_(False)
            learning_rate, epochs = params.fine_tune_learning_rate, params.fine_tune_epochs
        else:
            learning_rate, epochs = params.learning_rate, params.epochs
        net.to(device)
        x = torch.from_numpy(np.ascontiguousarray(train.features, dtype=np.float32)).to(device)
        y = torch.from_numpy(train.labels.astype(np.int64)).to(device)
        # Shuffling draws from a CPU generator so the order is the same on every device.
        order = torch.Generator().manual_seed(common.seed)
        w = (torch.from_numpy(train.weight_array().astype(np.float32)).to(device)
             if train.weighted else None)
        epoch_loss = _train(net, params, learning_rate, epochs, x, y, order, w=w)
        changed: float | None = None
        if weights is not None and params.update_fraction < 1.0:
            # Delivery-aware fine-tune: keep only the largest changes, put every other
            # weight back to the champion's exact bits, and train the kept ones again with
            # the rest pinned. Unchanged weights cost a delta codec (nearly) nothing.
            masks = _largest_changes(net, weights, params.update_fraction)
            pin = _Pin(net, weights, masks)
            pin()
            epoch_loss = _train(net, params, learning_rate, epochs, x, y, order, pin, w)
            changed = pin.fraction_changed()
        net.eval().cpu()
        details: dict[str, Any] = {
            "device": device.type,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "torch": torch.__version__,
            "architecture": asdict(arch),
            "parameters": sum(p.numel() for p in net.parameters()),
            "classes": list(range(arch.classes)),
            "epochs": epochs,
            "learning_rate": learning_rate,
            "optimizer": params.optimizer,
            "final_train_loss": epoch_loss,
            "warm_start": {"used": weights is not None, "reason": warm_reason,
                           "frozen_layers": list(frozen),
                           "update_fraction": params.update_fraction if weights is not None
                           else None,
                           "weights_changed": changed},
        }
        return FittedModel(
            estimator=net,
            details=details,
            metadata={onnx_metadata.CLASSES: json.dumps(list(range(arch.classes))),
                      ARCHITECTURE_KEY: arch.to_json()},
        )

    def library_outputs(self, fitted: FittedModel, features: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        exported = _Exported(fitted.estimator).eval()
        with torch.no_grad():
            labels, scores = exported(torch.from_numpy(
                np.ascontiguousarray(features, dtype=np.float32)))
        return labels.numpy().astype(np.int64), scores.numpy()

    def to_onnx(self, fitted: FittedModel, common: CommonParams, target_opset: dict[str, int]
                ) -> onnx.ModelProto:
        exported = _Exported(fitted.estimator).eval()
        example = torch.zeros(2, len(common.features), dtype=torch.float32)
        batch = torch.export.Dim("batch")
        # The exporter logs and warns about things that do not concern this graph
        # (torchvision ops, its own deprecations, the opset down-conversion).
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
        levels = [lg.level for lg in quiet]
        try:
            for lg in quiet:
                lg.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    exported, (example,), dynamo=True, opset_version=target_opset[""],
                    input_names=["input"], output_names=["label", "scores"],
                    dynamic_shapes=({0: batch},), verbose=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from None
        finally:
            for lg, level in zip(quiet, levels, strict=True):
                lg.setLevel(level)
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        return program.model_proto

    def evaluate(self, fitted: FittedModel, params: CnnParams, common: CommonParams,
                 holdout: Split, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return classification_metrics(holdout, labels)


FAMILY = CnnFamily
