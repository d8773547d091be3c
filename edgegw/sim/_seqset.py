"""Which sequence numbers a device had acknowledged, or the cloud sink received: :class:`SeqSet`, a counter plus a
small set, with a compact JSON form for handing a fleet's acknowledged seqs to the sink."""

from __future__ import annotations

from collections.abc import Iterator


class SeqSet:
    """Sequence numbers (>= 1) seen: "every seq below ``low``" plus the stragglers above it.

    Acknowledgements and deliveries arrive almost in order, so this stays a counter and a small set.
    """

    __slots__ = ("_low", "_above")

    def __init__(self) -> None:
        self._low = 1
        self._above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there (or is not a valid seq)."""
        if seq < self._low:
            return False
        if seq == self._low:
            low = seq + 1
            above = self._above
            while low in above:
                above.remove(low)
                low += 1
            self._low = low
            return True
        if seq in self._above:
            return False
        self._above.add(seq)
        return True

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and (1 <= seq < self._low or seq in self._above)

    def __len__(self) -> int:
        return self._low - 1 + len(self._above)

    def __iter__(self) -> Iterator[int]:
        yield from range(1, self._low)
        yield from sorted(self._above)

    def to_ranges(self) -> list[list[int]]:
        """``[[first, last], ...]`` inclusive: compact enough to send a fleet's acknowledged seqs as JSON."""
        ranges: list[list[int]] = [[1, self._low - 1]] if self._low > 1 else []
        for seq in sorted(self._above):
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1][1] = seq
            else:
                ranges.append([seq, seq])
        return ranges

    @classmethod
    def from_ranges(cls, ranges: list[list[int]]) -> SeqSet:
        seqs = cls()
        for first, last in sorted(ranges):
            if first == seqs._low:
                seqs._low = last + 1
                while seqs._low in seqs._above:
                    seqs._above.remove(seqs._low)
                    seqs._low += 1
            else:
                for seq in range(first, last + 1):
                    seqs.add(seq)
        return seqs

    def count_missing_from(self, other: SeqSet) -> int:
        """How many of our seqs ``other`` lacks."""
        missing = sum(1 for s in self._above if s not in other)
        # The contiguous prefix: only ``other``'s gaps below our ``low`` can be missing.
        covered = min(self._low, other._low) - 1
        missing += sum(1 for s in range(covered + 1, self._low) if s not in other._above)
        return missing
