"""The shared inference engine: one per process, behind one small interface."""

from tuneloop.engine.base import Completion, Engine, Generation, Message, SamplingParams

__all__ = ["Completion", "Engine", "Generation", "Message", "SamplingParams", "create_engine"]


def create_engine(config, model_path: str | None = None) -> Engine:  # config: tuneloop.config.Config
    """The back end named by ``[model] backend``; ``local`` needs the base resolved to a folder."""
    backend = config.model.backend
    if backend == "local":
        from tuneloop.engine.local import LocalEngine

        if model_path is None:
            raise ValueError("the local engine needs model_path (trainer.models.resolve_base)")
        return LocalEngine.from_config(config, model_path)
    if backend == "openai":
        from tuneloop.engine.openai import OpenAIEngine

        return OpenAIEngine.from_config(config)
    raise ValueError(f"unknown engine backend {backend!r}")
