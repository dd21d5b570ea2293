"""The web console at ``/console``: the seeds' membership flows for operators and members."""

from console.auth import console_enabled
from console.blueprint import PREFIX, create_console_blueprint

__all__ = ["PREFIX", "console_enabled", "create_console_blueprint"]
