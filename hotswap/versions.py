"""One adapter version type, used by the store, the catalog, the controller, the replica and ``status``.

A version is what a replica runs: its URI plus the sha256 of its weights file and the sha256
of its ``adapter_config.json``. A change to either file is a new version and is validated
again (the same weights with another ``lora_alpha`` produce other outputs). :data:`BASE` is
the base model itself: every LoRA weight zero.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["BASE", "AdapterVersion", "config_digest"]


def config_digest(config_bytes: bytes) -> str:
    """The sha256 of an ``adapter_config.json`` as fetched (its exact bytes)."""
    return hashlib.sha256(config_bytes).hexdigest()


@dataclass(frozen=True, order=True)
class AdapterVersion:
    """An adapter version's stable identity (never ``hash()``-based: it crosses processes and restarts)."""

    uri: str
    sha256: str
    config_sha256: str = ""

    @property
    def is_base(self) -> bool:
        return self.sha256 == ""

    @classmethod
    def of_fetched(cls, fetched) -> AdapterVersion:
        """The version of a :class:`~hotswap.store.FetchedAdapter`."""
        return cls(fetched.uri, fetched.sha256, config_digest(fetched.config_bytes))

    @classmethod
    def of(cls, data: dict | None) -> AdapterVersion | None:
        """From :meth:`to_dict` (persisted state, RPC payloads); ``None`` stays ``None``."""
        if data is None:
            return None
        return cls(data["uri"], data["sha256"], data.get("config_sha256", ""))

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri, "sha256": self.sha256, "config_sha256": self.config_sha256}

    def as_dict(self) -> dict[str, str]:
        """The response fields and headers that name the version that produced an answer."""
        return {"adapter_uri": self.uri, "adapter_sha256": self.sha256, "adapter_config_sha256": self.config_sha256}

    @property
    def key(self) -> str:
        """A string key for JSON maps: ``<weights sha>.<config sha>@<uri>``."""
        return f"{self.sha256}.{self.config_sha256}@{self.uri}"

    def short(self) -> str:
        if self.is_base:
            return self.uri
        return f"{self.uri} ({self.sha256[:12]}/{self.config_sha256[:8]})"


BASE = AdapterVersion("base", "", "")
