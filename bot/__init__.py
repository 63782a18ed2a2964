"""tuneloop: a chatbot for Slack and Discord that learns from its users."""

__version__ = "0.1.0"
