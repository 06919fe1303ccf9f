"""Whether the Hugging Face hub may be asked: offline settings and a bounded reachability probe.

Without them a look-up of a name that is not in the local cache spends tens of seconds in retries before it fails
on a machine with no network; with them it fails at once, naming HF_HUB_OFFLINE.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says now, or as huggingface_hub read it at import."""
    if any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host accepts a connection within `timeout` s (DNS included, so a thread bounds it)."""
    import socket
    import threading
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:
        host = "huggingface.co"
    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def cache_only() -> bool:
    """True when only the local cache may be read: HF_HUB_OFFLINE is set, or the hub cannot be reached."""
    return hub_offline() or not hub_reachable()


@contextlib.contextmanager
def datasets_offline() -> Iterator[None]:
    """Within this block `datasets` reads its cache only (its offline flag is read once, at import)."""
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before
