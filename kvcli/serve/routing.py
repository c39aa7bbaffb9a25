"""Which replica holds a document: consistent hashing of document keys (kvcli.serve.replicas).

A ring of the live replicas, each at many points (virtual nodes), a key owned by the first
point after its hash. Removing a replica moves only the keys it owned; adding one takes
keys only from the others' arcs it lands on, so documents stay warm where they were. Pure
Python: no Ray needed to use or test it.
"""

from __future__ import annotations

import bisect
import hashlib
import os

from kvcli.errors import KvcliError

VIRTUAL_NODES = 64  # ring points per replica: documents spread evenly over few replicas


def _position(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class HashRing:
    """Consistent hashing: each member owns the arcs ending at its virtual nodes."""

    def __init__(self, members: list[str], virtual_nodes: int = VIRTUAL_NODES):
        if not members:
            raise ValueError("a ring needs at least one member")
        self.points = sorted((_position(f"{member}#{v}"), member) for member in set(members) for v in range(virtual_nodes))

    def owner(self, key: str) -> str:
        index = bisect.bisect(self.points, (_position(key), "")) % len(self.points)
        return self.points[index][1]


def document_key(body: dict) -> str:
    """What a request is routed by: its document's path, or the hash of its text."""
    if isinstance(body.get("document"), str):
        return "path:" + os.path.abspath(body["document"])
    if isinstance(body.get("text"), str):
        return "text:" + hashlib.sha256(body["text"].encode()).hexdigest()
    raise KvcliError("give exactly one of 'document' (a path) or 'text'")
