"""Errors the entrypoint turns into `output/failure` and a non-zero exit code.

Exit codes: 0 trained; 1 other training error; 2 bad command line (argparse);
3 hyperparameters; 4 data; 5 champion; 6 ONNX export; 70 unexpected internal error.
"""

from __future__ import annotations


class TrainingError(Exception):
    """A training run that cannot produce a model; the message is the failure reason."""

    exit_code = 1


class HyperparameterError(TrainingError):
    """A hyperparameter is missing, unknown or has a value that does not parse."""

    exit_code = 3


class DataError(TrainingError):
    """The train channel is missing, empty, corrupt or holds too little usable data."""

    exit_code = 4


class ChampionError(TrainingError):
    """The champion channel holds a model that cannot be loaded or run."""

    exit_code = 5


class ExportError(TrainingError):
    """The fitted model could not be converted to ONNX following the conventions."""

    exit_code = 6


class UnknownFamilyError(HyperparameterError):
    """The `family` hyperparameter names no registered model family."""


class FamilyUnavailableError(HyperparameterError):
    """The family exists but its optional dependencies (e.g. PyTorch) are not installed."""
