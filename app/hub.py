"""Whether the Hugging Face Hub answers, and whether an error means it did not."""
from __future__ import annotations


def is_hub_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the Hub could not be reached (offline mode, no network, a timeout)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                "ConnectTimeout", "Timeout", "TimeoutException", "ReadTimeout", "NetworkError"}:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("offline", "connection", "name resolution", "network is unreachable",
                                   "temporary failure", "max retries", "timed out"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that the Hub endpoint accepts a TCP connection (and offline mode is off), so an
    offline server answers at once instead of after the client's retries."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        url = urlparse(constants.ENDPOINT)
    except Exception:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
