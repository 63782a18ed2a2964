"""The core services one serving process shares: every adapter gets this one object."""

from __future__ import annotations

from dataclasses import dataclass

from bot.admin import Admin
from bot.chat import Chat
from bot.feedback import Feedback
from tuneloop.config import Config
from tuneloop.engine import Engine
from tuneloop.store import Store


@dataclass
class Services:
    config: Config
    store: Store
    engine: Engine
    chat: Chat
    feedback: Feedback
    admin: Admin
