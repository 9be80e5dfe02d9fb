"""The resumable batch sampler (:class:`Batches`) and the validation windows (:func:`eval_batches`).

Training batches are windows of seq_len+1 tokens in one seeded global order shared by all
data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmtune.data.cache import too_few_tokens


def _windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window i = tokens[i·T : i·T + T + 1]; x its first T tokens, y the same shifted by one.
    Returns int64 tensors of shape (B, T)."""
    idx = window_ids[:, None] * seq_len + np.arange(seq_len + 1)  # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _n_windows(tokens: np.ndarray, seq_len: int) -> int:
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise too_few_tokens("given", len(tokens), seq_len)
    return n


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _round(right: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    """A Feistel round function: splitmix64's finalizer of (right + key), cut to the half width."""
    with np.errstate(over="ignore"):
        h = (right + key) * _MIX[0]
        h = (h ^ (h >> np.uint64(30))) * _MIX[1]
        h = (h ^ (h >> np.uint64(27))) * _MIX[2]
    return (h ^ (h >> np.uint64(31))) & mask


def feistel_order(offsets: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of range(n) for ``epoch``, evaluated at ``offsets``, in constant memory (a corpus of
    10^10 tokens has 10^7 windows: a permutation array of them would be 80 MB per epoch, growing with the corpus).

    A 6-round Feistel network on the smallest even number of bits that covers n is a permutation of that power of
    two; cycle-walking (apply it again until the value falls below n) makes it one of range(n) (Black & Rogaway,
    "Ciphers with Arbitrary Finite Domains", 2002)."""
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence((seed, epoch)).generate_state(6, dtype=np.uint64)
    out = np.asarray(offsets, dtype=np.uint64).copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        x = out[todo]
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ _round(right, k, mask)
        out[todo] = (left << half) | right
        todo &= out >= np.uint64(n)
    return out.astype(np.int64)


class Batches:
    """Seeded, resumable sampling of non-overlapping windows, shared out across data-parallel ranks.

    The split holds n = (len-1)//seq_len windows. Epoch e visits them in the order
    ``default_rng((seed, e)).permutation(n)``; the epochs' orders laid end to end form one global
    stream of window ids. Each ``next()`` consumes ``world_size·micro_batch_size`` positions of it,
    starting at g, and rank r takes positions ``g + r + world_size·j`` for j < micro_batch_size. So
    the ranks of one step together see exactly what one worker with world_size·micro_batch_size
    would, and the state to resume (on any number of ranks) is the single position g.

    ``order="feistel"`` (prepared shards, corpora larger than memory) draws each epoch's order from
    :func:`feistel_order` instead, in constant memory; ``permutation`` (the default) keeps the order every
    in-memory corpus has always had.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, order: str = "permutation") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens, self.seq_len = tokens, seq_len
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed = seed % (1 << 64)  # SeedSequence entropy must be non-negative
        self.n_windows = _n_windows(tokens, seq_len)
        self.position = 0
        """Global stream positions consumed so far (by all ranks together)."""
        self._orders: dict[int, np.ndarray] = {}
        if order not in ("permutation", "feistel"):
            raise ValueError(f"order {order!r}: expected 'permutation' or 'feistel'")
        self.order = order

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # a step spans at most a few epochs; keep memory flat
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
        return self._orders[epoch]

    def window_ids(self, position: int | None = None) -> np.ndarray:
        """This rank's window ids for the draw that starts at ``position`` (default: the next one)."""
        g = self.position if position is None else position
        positions = g + self.rank + self.world_size * np.arange(self.micro_batch_size)
        epochs, offsets = np.divmod(positions, self.n_windows)
        if self.order == "feistel":
            out = np.empty(len(offsets), dtype=np.int64)
            for e in np.unique(epochs):
                out[epochs == e] = feistel_order(offsets[epochs == e], self.n_windows, self.seed, int(e))
            return out
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 CPU tensors of shape (micro_batch_size, seq_len)."""
        ids = self.window_ids()
        self.position += self.world_size * self.micro_batch_size
        return _windows(self.tokens, ids, self.seq_len)

    __next__ = next

    def __iter__(self) -> Batches:
        return self

    @property
    def epoch(self) -> float:
        """Passes over the split so far (consumed windows / n)."""
        return self.position / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["n_windows"] != self.n_windows:
            raise ValueError(f"data state is for seed {state['seed']} and {state['n_windows']} windows, "
                             f"this sampler has seed {self.seed} and {self.n_windows}: not the same data order")
        self.position = int(state["position"])


IGNORE_INDEX = -100
"""Target id that F.cross_entropy leaves out of its mean (its default ignore_index)."""


def eval_batches(tokens: np.ndarray, seq_len: int, micro_batch_size: int,
                 n_sequences: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The validation set: the first ``n_sequences`` windows in order (all of them when the split has fewer;
    none twice), as ``(x, y, n_valid)`` micro-batches of ``micro_batch_size`` rows. The last micro-batch is
    padded to full size (with the first windows again) and its padding rows' targets set to
    :data:`IGNORE_INDEX`, so every batch has one shape (no recompile) and the mean over the valid rows is
    the same whatever the micro-batch size."""
    n = _n_windows(tokens, seq_len)
    n_sequences = min(n_sequences, n)
    for start in range(0, n_sequences, micro_batch_size):
        valid = min(micro_batch_size, n_sequences - start)
        ids = (start + np.arange(micro_batch_size)) % n
        x, y = _windows(tokens, ids, seq_len)
        if valid < micro_batch_size:
            y[valid:] = IGNORE_INDEX
        yield x, y, valid
