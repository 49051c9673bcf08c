"""Files on the Hugging Face hub, fetched through `huggingface_hub` rather than by hand.

Written as `hf://ORG/REPO/PATH[@REV]` (or huggingface_hub's own `hf://ORG/REPO@REV/PATH`) or as
a `https://huggingface.co/ORG/REPO/resolve/REV/PATH` url. Going through `hf_hub_download`
means the user's Hugging Face cache is shared with every other tool, and HF_HOME,
HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE work as users expect. The hub's ETag
of an LFS file is its sha256, so no checksum file is needed: every online use asks the hub
for the current ETag and downloads again only when it changed.

huggingface_hub is imported inside the functions: it is slow to import, and only configs
that name hub files need it.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from dalle2_cli import __version__
from dalle2_cli.errors import Dalle2Error, InputError, literal
from dalle2_cli.messages import Log, stderr
from dalle2_cli.sources.digests import file_sha256

HUB_HOSTS = ("huggingface.co", "hf.co")
REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubFile:
    """One file of one hub repository at one revision."""

    repo_id: str
    filename: str
    revision: str = "main"
    repo_type: str = "model"

    @property
    def uri(self) -> str:
        """The canonical `hf://` spelling, as `models list` shows it and `models rm` takes it."""
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        revision = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf://{prefix}{self.repo_id}/{self.filename}{revision}"


def parse_hub_url(url: str) -> HubFile | None:
    """The hub file a url names, or None for a url that is not a hub file download.

    `hf://` urls that do not parse are an error; https urls that are not hub `resolve` urls
    (a `raw/` LFS pointer, another site) are plain urls, downloaded by dalle2-cli itself.
    """
    if url.startswith("hf://"):
        return _parse_hf_uri(url)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.netloc.lower() not in _hub_netlocs():
        return None
    parts = [urllib.parse.unquote(part) for part in parsed.path.strip("/").split("/")]
    repo_type = "model"
    if parts and parts[0] in REPO_TYPE_PREFIXES:
        repo_type = REPO_TYPE_PREFIXES[parts[0]]
        parts = parts[1:]
    # ORG/REPO/resolve/REV/PATH, or REPO/resolve/REV/PATH for the old repos without an org.
    for at in (2, 1):
        if len(parts) > at + 2 and parts[at] == "resolve":
            hub = HubFile("/".join(parts[:at]), "/".join(parts[at + 2 :]), parts[at + 1], repo_type)
            _check(hub, url)
            return hub
    return None


def _hub_netlocs() -> set[str]:
    # A mirror named by HF_ENDPOINT serves the same `resolve` urls as huggingface.co.
    netlocs = set(HUB_HOSTS)
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        netlocs.add(urllib.parse.urlparse(endpoint).netloc.lower())
    return netlocs


def _parse_hf_uri(url: str) -> HubFile:
    rest = url[len("hf://") :]
    repo_type = "model"
    first, _, tail = rest.partition("/")
    if first in REPO_TYPE_PREFIXES:
        repo_type, rest = REPO_TYPE_PREFIXES[first], tail
    parts = rest.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise InputError(f"{url}: a hub url is hf://ORG/REPO/PATH or hf://ORG/REPO/PATH@REVISION")
    org, repo, path = parts
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if "@" in path:
        if revision is not None:
            raise InputError(f"{url}: give the revision once (hf://ORG/REPO/PATH@REVISION)")
        path, revision = path.rsplit("@", 1)
    if revision == "":
        raise InputError(f"{url}: the revision after '@' is empty")
    hub = HubFile(f"{org}/{repo}", path, revision or "main", repo_type)
    _check(hub, url)
    return hub


def _check(hub: HubFile, url: str) -> None:
    """Refuse names that are not a repository, and paths that could leave the cache."""
    if not all(_NAME.fullmatch(part) for part in hub.repo_id.split("/")):
        raise InputError(f"{url}: {hub.repo_id!r} is not a hub repository name (ORG/REPO)")
    segments = hub.filename.split("/")
    if "\0" in hub.filename or "\\" in hub.filename or any(s in ("", ".", "..") for s in segments):
        raise InputError(f"{url}: the file path {hub.filename!r} must be relative, without '.', '..' or '//'")
    if "\0" in hub.revision or not hub.revision.strip():
        raise InputError(f"{url}: the revision {hub.revision!r} is not valid")


def hub_cache_dir() -> Path:
    """The Hugging Face cache this process uses (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_hub_file(
    hub: HubFile,
    *,
    offline: bool,
    show_progress: bool,
    sha256: str | None = None,
    config_name: str | None = None,
    check_updates: bool = True,
    log: Log = stderr,
) -> Path:
    """The cached path of `hub`, downloaded through `hf_hub_download` unless cached and current,
    and checked: its bytes must hash to what the hub names the blob by (and to the config's
    sha256). A cached file that does not is downloaded again (online) or refused (offline)."""
    local_only = offline or (not check_updates and cached_hub_file(hub) is not None)
    path = _hf_download(hub, local_only, show_progress, config_name, force=False)
    damage = _damage(path)
    if damage is not None and not offline:
        log(f"{hub.uri}: the cached copy {damage}; downloading it again")
        path = _hf_download(hub, False, show_progress, config_name, force=True)
        damage = _damage(path)
    if damage is not None:
        raise Dalle2Error(
            f"{hub.uri}: the cached copy {damage}: remove it with `dalle2 models rm {hub.uri}`, then "
            f"{fetch_hint(config_name)}"
        )
    if sha256 is not None:
        actual = file_sha256(path.resolve())
        if actual != sha256:
            raise Dalle2Error(
                f"{hub.uri} has sha256 {actual}, but the config expects {sha256}: the file changed on the hub "
                f"(pin a revision: {hub.uri.split('@')[0]}@COMMIT) or the config's sha256 is wrong"
            )
    return path


def _hf_download(hub: HubFile, local_only: bool, show_progress: bool, config_name: str | None, force: bool) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                hub.repo_id,
                hub.filename,
                revision=hub.revision,
                repo_type=hub.repo_type,
                # huggingface_hub reads HF_HUB_OFFLINE once, at import; this also covers an
                # offline switch made after that (in a long-lived Python process).
                local_files_only=local_only,
                force_download=force,
                library_name="dalle2-cli",
                library_version=__version__,
                tqdm_class=_progress_class(show_progress),
            )
        )
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types; each is translated
        raise _hub_error(hub, error, local_only, config_name) from None


def _damage(path: Path) -> str | None:
    """What is wrong with a cached hub file's bytes, or None: they must hash to the blob's name
    (an LFS file's sha256, a small file's git object id)."""
    named = expected_blob_digest(path)
    if named is None:
        return None
    kind, digest = named
    actual = file_sha256(path.resolve()) if kind == "sha256" else git_blob_sha1(path)
    if actual != digest:
        return f"is damaged (its {'sha256' if kind == 'sha256' else 'git object id'} is {actual}, not {digest})"
    return None


def _hub_error(hub: HubFile, error: Exception, offline: bool, config_name: str | None) -> Dalle2Error:
    from huggingface_hub import errors

    what = hub.uri
    if isinstance(error, errors.LocalEntryNotFoundError):
        if offline:
            return Dalle2Error(
                template=literal(f"{what} is not in the Hugging Face cache ({hub_cache_dir()}) and offline mode is on ")
                + "({offline=True} or HF_HUB_OFFLINE): "
                + literal(fetch_hint(config_name))
            )
        return Dalle2Error(
            f"cannot reach the Hugging Face hub for {what}, and it is not cached: check the network "
            "(and HF_ENDPOINT, if set), then run the command again"
        )
    # RemoteEntryNotFoundError is the name since huggingface_hub 1.0; EntryNotFoundError before.
    remote_missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    if isinstance(error, remote_missing):
        return NotOnHub(f"{what}: the hub has no file {hub.filename!r} in {hub.repo_id} at {hub.revision!r}")
    if isinstance(error, errors.RevisionNotFoundError):
        return Dalle2Error(f"{what}: {hub.repo_id} has no revision {hub.revision!r}")
    if isinstance(error, errors.GatedRepoError):
        return Dalle2Error(f"{what}: {hub.repo_id} is gated: accept its terms on the hub, then set HF_TOKEN")
    if isinstance(error, errors.RepositoryNotFoundError):
        return Dalle2Error(
            f"{what}: repository {hub.repo_id} not found, or private: check the name, or set HF_TOKEN for a private one"
        )
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        return Dalle2Error(f"{what}: the hub answered HTTP {status}; run the command again later")
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return Dalle2Error(f"download of {what} failed: {message}; run the command again to retry")


class NotOnHub(Dalle2Error):
    """The repository (at that revision) has no such file."""


def fetch_hint(config_name: str | None) -> str:
    """How to fill the cache for a config, for messages about files missing offline."""
    config = config_name or "CONFIG"
    return f"fetch it first with `dalle2 models download -c {config}` while online"


def _progress_class(show: bool) -> type:
    """A tqdm class that shows hub downloads exactly when ours show a bar.

    The CLI sets TQDM_DISABLE to silence dalle2-pytorch's per-step bars; an explicit `disable`
    overrides it for the one bar worth seeing, the download's."""
    from tqdm.auto import tqdm

    class HubProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = not show
            super().__init__(*args, **kwargs)

    return HubProgress


def cached_hub_file(hub: HubFile) -> Path | None:
    """The file's path in the Hugging Face cache, or None when it is not cached. No network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub.repo_id, hub.filename, revision=hub.revision, repo_type=hub.repo_type)
    return Path(found) if isinstance(found, str) and Path(found).exists() else None


def expected_blob_digest(path: Path) -> tuple[str, str] | None:
    """What the hub says a cached file's content hashes to: ("sha256", hex) for LFS blobs,
    ("git-sha1", hex) for small files kept in git, from the blob's file name."""
    name = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        return "sha256", name
    if re.fullmatch(r"[0-9a-f]{40}", name):
        return "git-sha1", name
    return None


def git_blob_sha1(path: Path) -> str:
    """Git's object id of a file: sha1 over `blob SIZE\\0` and the content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def remove_cached_hub_file(path: Path) -> list[Path]:
    """Remove one file from the Hugging Face cache: its snapshot entry, and its blob when no
    other snapshot of the repository uses it. Returns what was removed."""
    removed = []
    blob = path.resolve()
    repo_dir = _repo_dir(path)
    if path.is_symlink():
        path.unlink()
        removed.append(path)
        still_used = repo_dir is not None and any(
            link.is_symlink() and link.resolve() == blob for link in (repo_dir / "snapshots").rglob("*")
        )
        if not still_used and blob.exists():
            blob.unlink()
            removed.append(blob)
    elif path.exists():  # a cache without symlinks keeps a copy in the snapshot
        path.unlink()
        removed.append(path)
    return removed


def _repo_dir(path: Path) -> Path | None:
    """models--ORG--REPO, from a path inside its snapshots/COMMIT/ folder."""
    for parent in path.parents:
        if parent.name == "snapshots":
            return parent.parent
    return None
