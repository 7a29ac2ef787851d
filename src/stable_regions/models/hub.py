"""Models named by Hugging Face Hub id (``org/name``), found in the local Hugging Face cache.

The cache is the one ``huggingface_hub`` writes: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. A model there
is ``models--org--name/`` with ``refs/<branch or tag>`` holding a commit hash and
``snapshots/<commit>/`` holding the files. Resolving reads those files only: nothing
touches the network. ``download_model`` fetches a snapshot when the user asks for it
(``download=True``, ``--download``): its configuration, tokenizer and safetensors weights,
never pickles or code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import ModelNotInstalledError, StableRegionsError, one_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what a causal LM needs to load, and nothing that runs code or unpickles
DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
]


def is_hub_id(spec: str) -> bool:
    """``org/name`` with the characters the Hub allows (a local path is tried first)."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def hub_cache() -> Path:
    """The Hugging Face cache, from the same variables ``huggingface_hub`` reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache()) / ("models--" + repo_id.replace("/", "--"))


def fetch_command(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"stable-regions models download {repo_id}{rev}"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` (a branch, a tag or a commit;
    default ``main``) in the local cache. Refused in one line, naming the cache searched and
    the command that fetches it, where it is not there."""
    cache = hub_cache()
    folder = repo_folder(repo_id, cache)
    if not (folder / "snapshots").is_dir():
        raise ModelNotInstalledError(
            f"{repo_id} is not in the Hugging Face cache ({cache}): fetch it with "
            f"`{fetch_command(repo_id, revision)}` or pass `download=True`"
        )
    wanted = revision or "main"
    if _COMMIT.match(wanted):
        commit = wanted
    else:
        ref = folder / "refs" / wanted
        if not ref.is_file():
            raise _revision_missing(repo_id, wanted, cache, folder)
        commit = ref.read_text().strip()
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        raise _revision_missing(repo_id, wanted, cache, folder)
    return snapshot


def _revision_missing(repo_id: str, wanted: str, cache: Path, folder: Path) -> Exception:
    return ModelNotInstalledError(
        f"revision {wanted!r} of {repo_id} is not in the Hugging Face cache ({cache}; "
        f"cached: {', '.join(_cached_revisions(folder)) or 'none'}): fetch it with "
        f"`{fetch_command(repo_id, wanted)}`"
    )


def _cached_revisions(folder: Path) -> list[str]:
    refs = folder / "refs"
    named = sorted(p.name for p in refs.iterdir() if p.is_file()) if refs.is_dir() else []
    commits = sorted(p.name[:12] for p in (folder / "snapshots").iterdir() if p.is_dir())
    return named + [c for c in commits if c not in named]


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """Fetch ``repo_id`` at ``revision`` into the Hugging Face cache (configuration, tokenizer,
    safetensors weights only) and return its snapshot directory. Offline, or where the Hub
    refuses, one line; a repository folder this call created is removed again, so a failed
    download leaves nothing half-written behind."""
    from huggingface_hub import snapshot_download

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise StableRegionsError(
            f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it, or copy the model "
            "into the Hugging Face cache and drop `download=True`"
        )
    cache = hub_cache()
    folder = repo_folder(repo_id, cache)
    existed = folder.exists()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=DOWNLOAD_PATTERNS,
        )
    except Exception as exc:  # network, authentication, unknown repository or revision
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise StableRegionsError(f"could not download {repo_id}: {one_line(exc)}") from None
    return Path(path)
