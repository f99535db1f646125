"""Downloads that fail in seconds without a network.

Download clients wait long on a machine without one (urllib has no timeout, the Hugging Face hub client
retries for about a minute), so a caller first probes the server with ``reachable`` and turns a failure
into one error naming what could not be fetched and the flag that takes a local file instead.
"""
import contextlib
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterator

PROBE_TIMEOUT_S = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443}


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url``'s server (or the proxy the environment names for it) accepts a connection within
    ``timeout`` seconds: one short attempt, the name lookup included."""
    target = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname):
        target = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or DEFAULT_PORTS.get(target.scheme, DEFAULT_PORTS["https"])
    connected = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            connected.set()
        except OSError:
            pass

    # In a thread because the name lookup ignores socket timeouts; a lookup left hanging dies with the process.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return connected.is_set()


@contextlib.contextmanager
def hub_offline_unless_reachable() -> Iterator[bool]:
    """Inside, the Hugging Face hub client works offline (its cache only) when the hub cannot be reached
    or ``HF_HUB_OFFLINE`` is set; yields whether it does."""
    from huggingface_hub import constants as hub  # read at call time, where HF_ENDPOINT has been applied
    offline = hub.HF_HUB_OFFLINE or not reachable(hub.ENDPOINT)
    was_offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, offline
    try:
        yield offline
    finally:
        hub.HF_HUB_OFFLINE = was_offline
