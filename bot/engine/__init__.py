"""The shared inference engine: one per process, behind one small interface."""

from bot.engine.base import Completion, Engine, Generation, Message, SamplingParams

__all__ = ["Completion", "Engine", "Generation", "Message", "SamplingParams", "create_engine"]


def create_engine(config) -> Engine:  # config: bot.config.Config
    """The back end named by ``[model] backend``."""
    backend = config.model.backend
    if backend == "local":
        from bot.engine.local import LocalEngine

        return LocalEngine.from_config(config)
    if backend == "openai":
        from bot.engine.openai import OpenAIEngine

        return OpenAIEngine.from_config(config)
    raise ValueError(f"unknown engine backend {backend!r}")
