"""Address bitmap, pure-Python reference (twin of ``coil/_fast/bitmap.pyx``).

Bits live in a list of 64-bit words; bit ``i`` is bit ``i % 64`` of word
``i // 64``. The padding bits of the last word (past ``size``) are kept set,
so a free bit found by a word scan is always a valid index. ``BitmapFull``
is defined here only; the extension imports it, so both backends raise the
same class.
"""

from __future__ import annotations

from operator import index as _index

from coil.errors import BitmapError

__all__ = ["Bitmap", "BitmapFull", "MAX_SIZE"]

#: Largest accepted size in bits (512 MiB of words).
MAX_SIZE = 1 << 32

_FULL = (1 << 64) - 1


class BitmapFull(BitmapError):
    """No free bit is left in the bitmap."""


def _check_size(size) -> int:
    size = _index(size)
    if size <= 0 or size > MAX_SIZE:
        raise BitmapError(f"bitmap size must be between 1 and {MAX_SIZE}, got {size}")
    return size


def _out_of_range(i, size) -> BitmapError:
    return BitmapError(f"bit index {i} out of range for bitmap of size {size}")


class Bitmap:
    """Fixed-size set of bit indexes ``0 .. size-1``, all free at first.

    Raises BitmapError if ``size`` is not in ``1 .. MAX_SIZE``, TypeError if
    it is not an integer.
    """

    __slots__ = ("_size", "_words", "_count")

    def __init__(self, size):
        size = _check_size(size)
        nwords = (size + 63) >> 6
        words = [0] * nwords
        tail = size & 63
        if tail:
            words[-1] = _FULL ^ ((1 << tail) - 1)  # padding bits stay set
        self._size = size
        self._words = words
        self._count = 0

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"Bitmap(size={self._size}, used={self._count})"

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self._size == other._size and self._words == other._words

    __hash__ = None  # mutable

    def __reduce__(self):
        return (type(self).from_bytes, (self._size, self.to_bytes()))

    def _index(self, i) -> int:
        i = _index(i)
        if not 0 <= i < self._size:
            raise _out_of_range(i, self._size)
        return i

    def _find(self, hint) -> int:
        size = self._size
        if not 0 <= hint < size:
            hint = _index(hint) % size
        words = self._words
        w = hint >> 6
        inv = ~words[w] & (_FULL << (hint & 63)) & _FULL
        if inv:
            return (w << 6) | ((inv & -inv).bit_length() - 1)
        nwords = len(words)
        for rng in (range(w + 1, nwords), range(0, w + 1)):
            for w in rng:
                word = words[w]
                if word != _FULL:
                    inv = ~word & _FULL
                    return (w << 6) | ((inv & -inv).bit_length() - 1)
        return -1

    def find_free(self, hint=0) -> int:
        """Lowest free index >= hint (wrapping to 0), or -1 when full.

        ``hint`` is taken modulo size. Raises TypeError for a non-integer.
        """
        return self._find(hint)

    def allocate(self, hint=0) -> int:
        """Mark and return the lowest free index >= hint, wrapping to 0.

        ``hint`` is taken modulo size. Raises BitmapFull when no bit is free,
        TypeError for a non-integer hint.
        """
        i = self._find(hint)
        if i < 0:
            raise BitmapFull(f"bitmap of size {self._size} is full")
        self._words[i >> 6] |= 1 << (i & 63)
        self._count += 1
        return i

    def set(self, i) -> None:
        """Mark bit ``i`` used (no-op if it is). Raises BitmapError if out of range."""
        i = self._index(i)
        words = self._words
        w = i >> 6
        bit = 1 << (i & 63)
        word = words[w]
        if not word & bit:
            words[w] = word | bit
            self._count += 1

    def free(self, i) -> None:
        """Mark bit ``i`` free (no-op if it is). Raises BitmapError if out of range."""
        i = self._index(i)
        words = self._words
        w = i >> 6
        bit = 1 << (i & 63)
        word = words[w]
        if word & bit:
            words[w] = word ^ bit
            self._count -= 1

    def test(self, i) -> bool:
        """True if bit ``i`` is used. Raises BitmapError if out of range."""
        i = self._index(i)
        return bool(self._words[i >> 6] >> (i & 63) & 1)

    def count(self) -> int:
        """Number of used bits."""
        return self._count

    def used(self) -> list[int]:
        """All used indexes, ascending."""
        out = []
        words = self._words
        last = len(words) - 1
        tail = self._size & 63
        for w, word in enumerate(words):
            if w == last and tail:
                word &= (1 << tail) - 1
            base = w << 6
            while word:
                low = word & -word
                out.append(base | (low.bit_length() - 1))
                word ^= low
        return out

    def to_bytes(self) -> bytes:
        """Bit ``i`` is bit ``i % 8`` of byte ``i // 8``; length ceil(size/8)."""
        nbytes = (self._size + 7) >> 3
        data = bytearray(b"".join(w.to_bytes(8, "little") for w in self._words)[:nbytes])
        tail = self._size & 7
        if tail:
            data[-1] &= (1 << tail) - 1
        return bytes(data)

    @classmethod
    def from_bytes(cls, size, data) -> "Bitmap":
        """Inverse of ``to_bytes``.

        Raises BitmapError for a bad size, a wrong length or bits set past
        size; TypeError if ``data`` is not bytes-like.
        """
        size = _check_size(size)
        raw = memoryview(data).tobytes()
        nbytes = (size + 7) >> 3
        if len(raw) != nbytes:
            raise BitmapError(
                f"bitmap of size {size} needs {nbytes} bytes, got {len(raw)}")
        tail = size & 7
        if tail and raw[-1] >> tail:
            raise BitmapError(f"bits set past the end of a bitmap of size {size}")
        self = cls(size)
        words = self._words
        count = 0
        for w in range(len(words)):
            word = int.from_bytes(raw[w << 3:(w + 1) << 3], "little")
            count += word.bit_count()
            words[w] |= word
        self._count = count
        return self
