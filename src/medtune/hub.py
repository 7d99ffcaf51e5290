"""Reaching the Hugging Face hub: access checks, one file of a repo, streamed datasets, and one line when it fails.

Every remote access fails before any long step with one MedtuneError naming what it tried to reach and what to do:
a gated or private repo says how to get access; no network (DNS failure, a proxy, an air-gapped cluster) says to
use a local path, a warm cache with HF_HUB_OFFLINE=1, or a mirror through HF_ENDPOINT. With HF_HUB_OFFLINE=1 the
hub is never asked: everything comes from the local cache, and what is not there is one line too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any

from medtune.errors import MedtuneError

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_WAYS = "a warm cache with HF_HUB_OFFLINE=1, or a mirror through HF_ENDPOINT"


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{repo_id}" if repo_type == "dataset" else f"{endpoint}/{repo_id}"


def network_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises: OSError (requests, sockets) and the transport errors of the HTTP client
    huggingface_hub uses (httpx in 1.x, httpx2 in 2.x), which are not OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def unreachable(what: str, repo_id: str, exc: BaseException, repo_type: str = "model") -> MedtuneError:
    """The one line for a hub that can't be reached."""
    return MedtuneError(f"{what} {repo_id}: cannot reach {repo_url(repo_id, repo_type)} ({_first_line(exc)}); use a "
                        f"local path instead, or {OFFLINE_WAYS}")


def check_hub_access(repo_id: str, revision: str | None, repo_type: str = "model", what: str = "base.model") -> None:
    """Fail fast, before any long step, when a hub repo can't be read: gated, missing or private, or no network.

    Skipped with HF_HUB_OFFLINE=1: loading then reads the local cache only.
    """
    if offline():
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    url = repo_url(repo_id, repo_type)
    try:
        HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type)
    except GatedRepoError:
        raise MedtuneError(
            f"{what} {repo_id} is gated: accept its licence at {url} with your account, then run `hf auth login` "
            "(or set HF_TOKEN) and start again"
        ) from None
    except RepositoryNotFoundError:
        raise MedtuneError(
            f"{what} {repo_id}: not found on the hub, or private and no valid token is set (`hf auth login` / "
            "HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise MedtuneError(
                f"{what} {repo_id}: the hub refused access (HTTP {status}); accept the licence at {url} and log in "
                "with `hf auth login` (or set HF_TOKEN)"
            ) from None
        raise MedtuneError(f"{what} {repo_id}: hub request to {url} failed ({_first_line(exc)}); use a local path "
                           f"instead, or {OFFLINE_WAYS}") from None
    except network_errors() as exc:
        raise unreachable(what, repo_id, exc, repo_type) from None


def hub_file(repo_id: str, filename: str, revision: str | None, repo_type: str = "dataset",
             what: str = "data.dataset") -> str:
    """The local path of one file of a hub repo, downloaded once (or from the cache with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    check_hub_access(repo_id, revision, repo_type, what)
    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision)
    except LocalEntryNotFoundError:
        if offline():
            raise MedtuneError(f"{what} {repo_id}: {filename} is not in the local Hugging Face cache and "
                               "HF_HUB_OFFLINE=1 forbids downloading it; download it once with network, or point "
                               "at a local copy") from None
        raise MedtuneError(f"{what} {repo_id}: could not download {filename} from {repo_url(repo_id, repo_type)}; "
                           f"use a local copy instead, or {OFFLINE_WAYS}") from None
    except EntryNotFoundError:
        raise MedtuneError(f"{what} {repo_id}: the repo has no file {filename!r}") from None
    except network_errors() as exc:
        raise unreachable(what, repo_id, exc, repo_type) from None


def stream_dataset(dataset: str, config: str | None, split: str, revision: str | None) -> Iterator[dict[str, Any]]:
    """The rows of one split of a hub dataset through the `datasets` library, streamed (no full download).

    Access and the split/config names are checked now, before any long step; with HF_HUB_OFFLINE=1 the rows come
    from the `datasets` cache instead of a stream.
    """
    try:
        import datasets
    except ImportError:
        raise MedtuneError(f"data.dataset {dataset}: streaming a hub dataset needs the `datasets` library: pip install "
                           "datasets (or set data.data_file to read one file of the dataset)") from None
    check_hub_access(dataset, revision, "dataset", "data.dataset")
    try:
        rows = datasets.load_dataset(dataset, name=config, split=split, revision=revision, streaming=not offline())
    except ValueError as exc:  # an unknown split or config: the message lists the ones the dataset has
        raise MedtuneError(f"data.dataset {dataset}: {_first_line(exc)}; set data.split / data.config to one the "
                           "dataset has") from None
    except FileNotFoundError as exc:  # datasets' DatasetNotFoundError: gated, private or missing
        raise MedtuneError(f"data.dataset {dataset}: {_first_line(exc)}; log in with `hf auth login` (or set "
                           "HF_TOKEN) if it is gated or private") from None
    except network_errors() as exc:
        raise unreachable("data.dataset", dataset, exc, "dataset") from None
    return _rows(rows, dataset)


def _rows(rows: Any, dataset: str) -> Iterator[dict[str, Any]]:
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except network_errors() as exc:
            raise MedtuneError(f"data.dataset {dataset}: the stream from {repo_url(dataset, 'dataset')} broke off "
                               f"({_first_line(exc)}); run again, or download the dataset and set data.path") from None
        yield row
