"""MLEdgeDeploy device agent and SDK.

Embedding API:
    from mledge_edge import ModelHandle, LoadedModel, Agent, AgentConfig
    agent = Agent(AgentConfig(thing=..., model=..., ...)); agent.start()
    agent.handle.predict(features) -> Prediction(label, score, anomaly, model_version, scores)
"""

from .agent import Agent
from .config import AgentConfig, ConfigError
from .model import LoadedModel, ModelHandle, ModelInfo, ModelLoadError, NoModelError, Prediction
from .store import ModelStore
from .updater import UpdateFailedError, Updater, UpdateRejectedError

__all__ = [
    "Agent",
    "AgentConfig",
    "ConfigError",
    "LoadedModel",
    "ModelHandle",
    "ModelInfo",
    "ModelLoadError",
    "ModelStore",
    "NoModelError",
    "Prediction",
    "UpdateFailedError",
    "UpdateRejectedError",
    "Updater",
]
