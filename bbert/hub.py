"""Hugging Face hub access: tell at once when the hub can't be reached, and name the offline way.

See the introduction chapter (``book/intro.md``) for offline use.
"""
from __future__ import annotations

import os
import socket

from bbert.env import env_flag


def hub_offline() -> bool:
    """True when the Hugging Face hub can't be reached (HF_HUB_OFFLINE set, or no route).

    Checked in about a second so that hub loaders fail at once instead of retrying.
    """
    if env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE"):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=1.5):
            return False
    except OSError:
        return True


class HubUnavailableError(ConnectionError):
    """Raised at once when something must come from the hub and the hub can't be reached."""


def require_hub(what: str, offline_alternative: str) -> None:
    """Raise :class:`HubUnavailableError` naming ``offline_alternative`` if the hub is unreachable."""
    if hub_offline():
        raise HubUnavailableError(
            f"{what} needs the Hugging Face hub, which can't be reached from here "
            f"(offline, or HF_HUB_OFFLINE=1). Offline alternative: {offline_alternative}"
        )
