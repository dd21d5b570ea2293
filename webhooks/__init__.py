"""HTTP intake of Clerk webhooks: verify, store in the inbox, acknowledge, hand off to the broker."""

from webhooks.app import create_webhook_blueprint
from webhooks.dispatch import Dispatcher

__all__ = ["Dispatcher", "create_webhook_blueprint"]
