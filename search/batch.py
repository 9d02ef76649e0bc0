"""What one fitness call scores: a few calibration sequences, whole or as a prefix.

A selection stage of N tokens with N < seq_len scores the first N positions of one sequence (a prefix is a
valid input under causal attention: position t sees only positions <= t); N >= seq_len scores
ceil(N / seq_len) whole sequences. Every candidate of a stage is scored on the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tyr.errors import TyrError


@dataclass(frozen=True)
class Batch:
    """The calibration tokens of one fitness call.

    Attributes:
        sequences: calibration sequence indices, sorted and distinct in the search's own batches.
        num_positions: the first `num_positions` positions of each sequence are scored; None = whole sequences.
    """

    sequences: tuple[int, ...]
    num_positions: int | None = None

    def __post_init__(self) -> None:
        sequences = tuple(int(i) for i in np.asarray(self.sequences).reshape(-1))
        object.__setattr__(self, "sequences", sequences)  # arrays and lists in, a hashable tuple kept
        if not sequences:
            raise TyrError("a fitness batch needs at least one calibration sequence")
        n = self.num_positions
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise TyrError(f"a fitness batch scores at least one position per sequence, got {n!r}")
        if n is not None:
            object.__setattr__(self, "num_positions", int(n))

    def positions(self, seq_len: int) -> int:
        """Positions scored per sequence of length `seq_len`; TyrError if the prefix is longer."""
        if self.num_positions is None:
            return seq_len
        if self.num_positions > seq_len:
            raise TyrError(
                f"a fitness batch asks for {self.num_positions} positions of sequences of {seq_len} tokens"
            )
        return self.num_positions

    def num_tokens(self, seq_len: int) -> int:
        return len(self.sequences) * self.positions(seq_len)

    def to_json(self) -> dict:
        return {"sequences": list(self.sequences), "num_positions": self.num_positions}

    @classmethod
    def from_json(cls, d: dict) -> Batch:
        return cls(tuple(d["sequences"]), d.get("num_positions"))


def stage_batch(rng: np.random.Generator, num_tokens: int, num_sequences: int, seq_len: int) -> Batch:
    """A stage's batch of `num_tokens` tokens, drawn from `rng` (one `choice` of distinct sequences, sorted).

    ceil(num_tokens / seq_len) sequences (at most `num_sequences`); below one sequence's length, a prefix of
    one. The draw does not depend on whether a prefix is scored, so schedules whose stage tokens are multiples
    of seq_len score exactly the sequences they always did.
    """
    n_seq = min(math.ceil(num_tokens / seq_len), num_sequences)
    indices = np.sort(rng.choice(num_sequences, size=n_seq, replace=False))
    return Batch(tuple(int(i) for i in indices), num_tokens if num_tokens < seq_len else None)


def as_batch(batch: Batch | Sequence[int] | np.ndarray) -> Batch:
    """`batch` itself, or plain sequence indices (the protocol before batches existed) as whole sequences."""
    return batch if isinstance(batch, Batch) else Batch(tuple(np.asarray(batch).reshape(-1).tolist()))
