"""A stand-alone fake Clerk: Backend API, Svix-signed webhook delivery with chaos, scenarios, snapshots."""

from emulator.chaos import ChaosConfig, Outage
from emulator.delivery import RETRY_SCHEDULE, WebhookDelivery
from emulator.errors import ClerkError
from emulator.scenario import Scenario, ScenarioReport, seed_state
from emulator.server import (
    DEFAULT_PORT,
    DEFAULT_SECRET_KEY,
    DEFAULT_SIGNING_SECRET,
    Emulator,
    EmulatorConfig,
    run_emulator,
    serve,
)
from emulator.state import State

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_SECRET_KEY",
    "DEFAULT_SIGNING_SECRET",
    "RETRY_SCHEDULE",
    "ChaosConfig",
    "ClerkError",
    "Emulator",
    "EmulatorConfig",
    "Outage",
    "Scenario",
    "ScenarioReport",
    "State",
    "WebhookDelivery",
    "run_emulator",
    "seed_state",
    "serve",
]
