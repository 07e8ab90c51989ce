"""Weights named by URL: downloaded once into the fastdeit cache folder (torch.hub's
downloader: a progress bar, and the sha256 prefix that torch.hub-style names carry, e.g.
`deit_tiny_patch16_224-a1311bcf.pth`, is checked), its sha256 stored beside it and checked
on every reuse, so a truncated or altered copy is fetched again instead of read."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

from fastdeit.errors import UserError
from fastdeit.runtime.atomic import atomic_write_text


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def sha256_of(path: Path, salt: str = "") -> str:
    """sha256 of `salt` then the file's bytes, read in blocks (weights and cache shards are large).
    The one file checksum: downloaded weights (unsalted) and teacher cache shards (salted)."""
    h = hashlib.sha256(salt.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_weights(source: str | Path, cache_dir: Path) -> Path:
    """A local path as it is; a URL's file in CACHE/weights/ (downloaded when missing or when
    it no longer matches its recorded sha256)."""
    if not is_url(source):
        return Path(source)
    import torch.hub

    url = str(source)
    name = Path(urlparse(url).path).name or "weights"
    dst = Path(cache_dir) / "weights" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    check = dst.with_name(dst.name + ".sha256")
    if dst.is_file() and check.is_file() and sha256_of(dst) == check.read_text().strip():
        return dst
    found = torch.hub.HASH_REGEX.search(name)
    prefix = found.group(1) if found and len(found.group(1)) >= 8 else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    check.unlink(missing_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=prefix, progress=True)
    except RuntimeError as e:  # the hash prefix in its name does not match what came
        raise UserError(f"{url}: {e}; nothing was kept") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"cannot download {url}: {reason}") from None
    atomic_write_text(sha256_of(dst), check)
    return dst
