"""Where a saved detector lives: a local folder or a Hugging Face Hub repo id.

:func:`resolve_model_path` turns what a user typed (``runs/tiles/model``, ``~/m``,
``someone/ccad-tiles``) into a local folder, and says plainly which of the two it was not:
a string that is neither an existing folder nor a valid repo id is "no such model folder"
(never a repo-id format error), and a repo id the Hub cannot serve names the id and why
(not found, gated, no such revision, offline / unreachable and not cached).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["looks_like_path", "is_repo_id", "resolve_model_path"]


def looks_like_path(text: str) -> bool:
    """True when ``text`` reads as a file-system path rather than a Hub ``owner/name`` id:
    it starts with ``.``, ``/``, ``~`` or ``\\``, holds a backslash or a drive letter, ends
    with a separator, or has more than one ``/``."""
    return (text.startswith((".", "/", "~", "\\")) or "\\" in text or text.endswith("/")
            or text.count("/") > 1 or (len(text) > 1 and text[1] == ":")
            or (os.sep != "/" and os.sep in text))


def is_repo_id(text: str) -> bool:
    """True when ``text`` is a syntactically valid Hub repo id (``name`` or ``owner/name``)."""
    if not text or looks_like_path(text):
        return False
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except ValueError:  # HFValidationError
        return False
    return True


def resolve_model_path(model_id: str | os.PathLike, revision: Optional[str] = None, cache_dir: Any = None,
                       force_download: bool = False, local_files_only: bool = False, token: Any = None) -> Path:
    """The local folder of a saved detector: ``model_id`` itself when it is a folder, else the
    Hub snapshot of the repo ``model_id`` (downloaded or from the cache).

    Raises :class:`ccad.pipeline.CheckpointError` (a ``ValueError``) with a message naming
    ``model_id``: ``"<id>: no such model folder (and not a Hugging Face Hub repo id)"`` for a
    path that does not exist, or why the Hub could not serve a valid repo id.
    """
    from .errors import CheckpointError

    text = str(model_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text}: is a file, not a model folder (a folder with config.json)")
    if not is_repo_id(text):
        raise CheckpointError(f"{text}: no such model folder (and not a Hugging Face Hub repo id)")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{text}: no such model folder, and the Hugging Face Hub repo {text!r}"
    try:
        return Path(snapshot_download(repo_id=text, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only,
                                      token=token))
    except GatedRepoError:
        raise CheckpointError(f"{where} is gated: accept its terms on huggingface.co and log in "
                              "(HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where} was not found (check the name; a private repo needs a token: "
                              "HF_TOKEN or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        why = ("offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE or local_files_only
               else "the Hub cannot be reached")
        raise CheckpointError(f"{where} could not be fetched: {why} and it is not in the local cache "
                              f"({type(exc).__name__})") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{where} could not be fetched: the Hub answered {exc}") from None
    except OSError as exc:  # connection refused, DNS, timeouts (httpx / requests errors are OSErrors or not)
        raise CheckpointError(f"{where} could not be fetched: the Hub cannot be reached ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. httpx.ConnectError, which is not an OSError
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3"):
            raise CheckpointError(f"{where} could not be fetched: the Hub cannot be reached ({exc})") from None
        raise
