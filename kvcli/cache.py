"""The compressed KV cache: per layer, only the kept tokens of each KV head, for real.

Ada-KV and KVzip give every KV head its own number of kept tokens. A boolean mask over a
full-size cache (what existing libraries hand back) saves no memory and no bandwidth, so
each layer stores its heads back to back in one flat buffer:

    keys, values : [B, capacity, D]   head h owns rows offsets[h] : offsets[h+1]
    positions    : [B, capacity]      original RoPE position of each row (-1 = free)
    offsets      : [Hkv + 1]          segment starts; each segment = kept + headroom
    lengths      : [B, Hkv]           rows in use per (sequence, head)

Keys are stored already rotated at their original positions, so a kept token attends
exactly as it did before eviction; new tokens continue at `next_position`, after the
document's original length. Every segment has headroom, so appending a decoded token is
one write per head, not a reallocation. B > 1 holds several sequences (e.g. several
questions) over the same document: segments are shared, lengths are per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows reserved per head for tokens appended after compression (question + answer).
# 512 covers a chat-formatted question and a 256-token answer; `append` grows the
# segments (one reallocation) if a longer conversation needs more.
DEFAULT_HEADROOM = 512


def segment_offsets(rows: torch.Tensor, headroom: int) -> torch.Tensor:
    """[Hkv + 1] int64 segment starts of the flat layout: head h owns rows[h] + headroom rows.

    The one place the layout is computed (the cache, the .kvc loader and growth use it)."""
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.cumsum(rows.long() + headroom, 0)
    return offsets


@dataclass
class LayerCache:
    keys: torch.Tensor  # [B, C, D]
    values: torch.Tensor  # [B, C, D]
    positions: torch.Tensor  # [B, C] int32
    offsets: torch.Tensor  # [Hkv + 1] int32
    lengths: torch.Tensor  # [B, Hkv] int32

    @property
    def num_kv_heads(self) -> int:
        return self.offsets.numel() - 1

    @property
    def capacity_per_head(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # [Hkv]

    @classmethod
    def from_heads(
        cls,
        keys: list[torch.Tensor],  # per head [n_h, D]
        values: list[torch.Tensor],  # per head [n_h, D]
        positions: list[torch.Tensor],  # per head [n_h] original positions
        headroom: int = DEFAULT_HEADROOM,
    ) -> "LayerCache":
        """One sequence's per-head rows laid out flat, each segment followed by `headroom`."""
        device = keys[0].device
        counts = torch.tensor([k.shape[0] for k in keys], dtype=torch.int64)
        offsets = segment_offsets(counts, headroom)
        capacity = int(offsets[-1])
        flat_keys = keys[0].new_zeros(1, capacity, keys[0].shape[-1])
        flat_values = values[0].new_zeros(1, capacity, values[0].shape[-1])
        flat_positions = torch.full((1, capacity), -1, dtype=torch.int32, device=device)
        for h, (k, v, p) in enumerate(zip(keys, values, positions)):
            start, n = int(offsets[h]), k.shape[0]
            flat_keys[0, start : start + n] = k
            flat_values[0, start : start + n] = v
            flat_positions[0, start : start + n] = p.to(device=device, dtype=torch.int32)
        return cls(flat_keys, flat_values, flat_positions, offsets.to(device, torch.int32), counts.to(device, torch.int32).unsqueeze(0))

    def head_rows(self, batch: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and positions in use for one (sequence, head): [n, D], [n, D], [n]."""
        start = int(self.offsets[head])
        stop = start + int(self.lengths[batch, head])
        return self.keys[batch, start:stop], self.values[batch, start:stop], self.positions[batch, start:stop]

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, *, reserved: bool = False) -> None:
        """Write new tokens after the rows in use: keys/values [B, Hkv, n, D], positions [B, n].

        reserved=True: the caller reserved the room (see `reserve`), so the capacity check,
        a device-to-host sync, is skipped: what a CUDA graph needs.
        """
        batch, num_heads, n, _ = keys.shape
        if not reserved:
            free = self.capacity_per_head.unsqueeze(0) - self.lengths  # [B, Hkv]
            if int(free.min()) < n:
                self._grow(max(n, int(self.capacity_per_head.max())))
        # dest rows: offsets[h] + lengths[b, h] + i                              # [B, Hkv, n]
        dest = (self.offsets[:-1].unsqueeze(0) + self.lengths).unsqueeze(-1).long() + torch.arange(
            n, device=keys.device
        )
        rows = torch.arange(batch, device=keys.device).view(batch, 1, 1).expand_as(dest)
        self.keys[rows, dest] = keys.to(self.keys.dtype)
        self.values[rows, dest] = values.to(self.values.dtype)
        self.positions[rows, dest] = positions.to(torch.int32).view(batch, 1, n).expand_as(dest)
        self.lengths += n

    def reserve(self, rows: int) -> None:
        """Make sure every head can take `rows` more tokens without reallocating."""
        free = self.capacity_per_head.unsqueeze(0) - self.lengths
        if int(free.min()) < rows:
            self._grow(rows)

    def sequence(self, b: int) -> "LayerCache":
        """A view of sequence b: appends through it land in this cache (reserve first)."""
        return LayerCache(self.keys[b : b + 1], self.values[b : b + 1], self.positions[b : b + 1], self.offsets, self.lengths[b : b + 1])

    def _grow(self, extra: int) -> None:
        """Give every head `extra` more rows of headroom (rare: a very long conversation)."""
        batch, _, head_dim = self.keys.shape
        old_offsets = self.offsets.long()
        new_offsets = segment_offsets(self.capacity_per_head.long(), extra)
        total = int(new_offsets[-1])
        keys = self.keys.new_zeros(batch, total, head_dim)
        values = self.values.new_zeros(batch, total, head_dim)
        positions = torch.full((batch, total), -1, dtype=torch.int32, device=self.keys.device)
        for h in range(self.num_kv_heads):
            old, new, size = int(old_offsets[h]), int(new_offsets[h]), int(self.capacity_per_head[h])
            keys[:, new : new + size] = self.keys[:, old : old + size]
            values[:, new : new + size] = self.values[:, old : old + size]
            positions[:, new : new + size] = self.positions[:, old : old + size]
        self.keys, self.values, self.positions = keys, values, positions
        self.offsets = new_offsets.to(torch.int32)

    def repeat(self, batch: int) -> "LayerCache":
        """The same cache for `batch` sequences (several questions over one document)."""
        assert self.keys.shape[0] == 1, "repeat a single-sequence cache"
        return LayerCache(
            keys=self.keys.expand(batch, -1, -1).clone(),
            values=self.values.expand(batch, -1, -1).clone(),
            positions=self.positions.expand(batch, -1).clone(),
            offsets=self.offsets.clone(),
            lengths=self.lengths.expand(batch, -1).clone(),
        )

    def nbytes_used(self) -> int:
        """Bytes of the K/V rows in use (what memory holds for the kept tokens)."""
        row = self.keys.shape[-1] * self.keys.element_size() * 2
        return int(self.lengths.sum()) * row


@dataclass
class CompressedCache:
    layers: list[LayerCache]
    next_position: torch.Tensor  # [B] position the next appended token gets
    original_length: int  # prompt tokens before compression (prefix + document [+ question])
    # The selection score of every row as compressed, per layer one float32 CPU tensor
    # [sum of lengths[0]] in the flat order (head after head, as a .kvc file stores rows);
    # +inf for rows always kept (the prefix, a kept question). With them a heavier cache is
    # a subset of this one, chosen by the same scores (kvcli.compress.pipeline.derive), with
    # no model pass. None: unknown (a full cache, progressive reading, an older file).
    # Working copies (clone, repeat, sequence) drop them: decoding appends unscored rows.
    scores: list[torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.next_position.numel())

    def kept_per_head(self, batch: int = 0) -> torch.Tensor:
        """[L, Hkv] rows in use per head."""
        return torch.stack([layer.lengths[batch].cpu() for layer in self.layers])

    def nbytes(self) -> int:
        return sum(layer.nbytes_used() for layer in self.layers)

    def sequence(self, b: int) -> "CompressedCache":
        """A view of sequence b (call `reserve` first: a reallocation would detach the view)."""
        return CompressedCache([layer.sequence(b) for layer in self.layers], self.next_position[b : b + 1], self.original_length)

    def reserve(self, rows: int) -> None:
        for layer in self.layers:
            layer.reserve(rows)

    def clone(self) -> "CompressedCache":
        return self.repeat(1)

    def repeat(self, batch: int) -> "CompressedCache":
        return CompressedCache(
            layers=[layer.repeat(batch) for layer in self.layers],
            next_position=self.next_position.expand(batch).clone(),
            original_length=self.original_length,
        )


def attend_reference(layer: LayerCache, query: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last n appended tokens over one layer's variable-length cache.

    query: [B, Hq, n, D], already rotated; the n queries are the n most recently appended
    rows of every head, so query i sees the first lengths - (n - 1 - i) rows (causal).
    Returns [B, Hq, n, D]. Plain torch, one (sequence, head) at a time: the reference the
    Triton kernel is tested against, and the CPU path.
    """
    batch, num_q_heads, n, _ = query.shape
    group = num_q_heads // layer.num_kv_heads
    out = torch.empty_like(query)
    causal = torch.arange(n, device=query.device)
    for b in range(batch):
        for h in range(layer.num_kv_heads):
            keys, values, _ = layer.head_rows(b, h)  # [S, D]
            length = keys.shape[0]
            q = query[b, h * group : (h + 1) * group]  # [G, n, D]
            logits = torch.matmul(q.float(), keys.float().T) * scale  # [G, n, S]
            visible = torch.arange(length, device=query.device).unsqueeze(0) <= (length - n + causal).unsqueeze(1)
            logits = logits.masked_fill(~visible, float("-inf"))
            out[b, h * group : (h + 1) * group] = torch.matmul(logits.softmax(-1), values.float()).to(query.dtype)
    return out
