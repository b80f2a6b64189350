# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Address bitmap, Cython version (twin of ``coil/_bitmap_py.py``).

Bits live in a C array of uint64 words; bit ``i`` is bit ``i % 64`` of word
``i // 64``. The padding bits of the last word (past ``size``) are kept set,
so a free bit found by a word scan is always a valid index.
"""

from cpython.number cimport PyNumber_Index
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free as c_free
from libc.string cimport memcmp

from coil.errors import BitmapError
from coil._bitmap_py import BitmapFull, MAX_SIZE

__all__ = ["Bitmap", "BitmapFull", "MAX_SIZE"]

cdef extern from *:
    """
    static inline int coil_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline int coil_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    """
    int coil_ctz64(unsigned long long x) nogil
    int coil_popcount64(unsigned long long x) nogil

cdef uint64_t FULL = <uint64_t>0xFFFFFFFFFFFFFFFF


cdef Py_ssize_t _check_size(object size) except -1:
    cdef object n = PyNumber_Index(size)
    if n <= 0 or n > MAX_SIZE:
        raise BitmapError(f"bitmap size must be between 1 and {MAX_SIZE}, got {n}")
    return n


cdef class Bitmap:
    """Fixed-size set of bit indexes ``0 .. size-1``, all free at first.

    Raises BitmapError if ``size`` is not in ``1 .. MAX_SIZE``, TypeError if
    it is not an integer.
    """

    cdef uint64_t *_words
    cdef Py_ssize_t _nwords
    cdef Py_ssize_t _size
    cdef Py_ssize_t _count

    def __cinit__(self, size, *args, **kwargs):
        cdef Py_ssize_t n = _check_size(size)
        cdef Py_ssize_t tail = n & 63
        self._nwords = (n + 63) >> 6
        self._words = <uint64_t *>calloc(self._nwords, sizeof(uint64_t))
        if self._words == NULL:
            raise MemoryError()
        if tail:
            self._words[self._nwords - 1] = FULL ^ ((<uint64_t>1 << tail) - 1)
        self._size = n
        self._count = 0

    def __dealloc__(self):
        c_free(self._words)
        self._words = NULL

    @property
    def size(self):
        return self._size

    def __len__(self):
        return self._size

    def __repr__(self):
        return f"Bitmap(size={self._size}, used={self._count})"

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        cdef Bitmap o = <Bitmap>other
        return (self._size == o._size and self._count == o._count and
                memcmp(self._words, o._words, self._nwords * sizeof(uint64_t)) == 0)

    def __reduce__(self):
        return (type(self).from_bytes, (self._size, self.to_bytes()))

    cdef inline Py_ssize_t _index(self, object i) except -1:
        cdef Py_ssize_t k
        try:
            k = i
        except OverflowError:
            raise BitmapError(f"bit index {i} out of range for bitmap of size {self._size}")
        if k < 0 or k >= self._size:
            raise BitmapError(f"bit index {k} out of range for bitmap of size {self._size}")
        return k

    cdef inline Py_ssize_t _hint(self, object hint) except -1:
        cdef Py_ssize_t h
        try:
            h = hint
        except OverflowError:
            h = hint % self._size   # Python modulo on the big int
        if h < 0 or h >= self._size:
            h = h % self._size      # Python semantics: result in 0 .. size-1
        return h

    cdef inline Py_ssize_t _find(self, Py_ssize_t hint) noexcept nogil:
        cdef uint64_t *words = self._words
        cdef Py_ssize_t w = hint >> 6
        cdef Py_ssize_t i
        cdef uint64_t inv = ~words[w] & (FULL << (hint & 63))
        if inv:
            return (w << 6) | coil_ctz64(inv)
        for i in range(w + 1, self._nwords):
            if words[i] != FULL:
                return (i << 6) | coil_ctz64(~words[i])
        for i in range(0, w + 1):
            if words[i] != FULL:
                return (i << 6) | coil_ctz64(~words[i])
        return -1

    def find_free(self, hint=0):
        """Lowest free index >= hint (wrapping to 0), or -1 when full.

        ``hint`` is taken modulo size. Raises TypeError for a non-integer.
        """
        return self._find(self._hint(hint))

    def allocate(self, hint=0):
        """Mark and return the lowest free index >= hint, wrapping to 0.

        ``hint`` is taken modulo size. Raises BitmapFull when no bit is free,
        TypeError for a non-integer hint.
        """
        cdef Py_ssize_t i = self._find(self._hint(hint))
        if i < 0:
            raise BitmapFull(f"bitmap of size {self._size} is full")
        self._words[i >> 6] |= <uint64_t>1 << (i & 63)
        self._count += 1
        return i

    def set(self, i):
        """Mark bit ``i`` used (no-op if it is). Raises BitmapError if out of range."""
        cdef Py_ssize_t k = self._index(i)
        cdef uint64_t bit = <uint64_t>1 << (k & 63)
        if not (self._words[k >> 6] & bit):
            self._words[k >> 6] |= bit
            self._count += 1

    def free(self, i):
        """Mark bit ``i`` free (no-op if it is). Raises BitmapError if out of range."""
        cdef Py_ssize_t k = self._index(i)
        cdef uint64_t bit = <uint64_t>1 << (k & 63)
        if self._words[k >> 6] & bit:
            self._words[k >> 6] ^= bit
            self._count -= 1

    def test(self, i):
        """True if bit ``i`` is used. Raises BitmapError if out of range."""
        cdef Py_ssize_t k = self._index(i)
        return (self._words[k >> 6] >> (k & 63)) & 1 == 1

    def count(self):
        """Number of used bits."""
        return self._count

    def used(self):
        """All used indexes, ascending."""
        cdef list out = []
        cdef Py_ssize_t w, base
        cdef uint64_t word
        cdef Py_ssize_t tail = self._size & 63
        for w in range(self._nwords):
            word = self._words[w]
            if tail and w == self._nwords - 1:
                word &= (<uint64_t>1 << tail) - 1
            base = w << 6
            while word:
                out.append(base | coil_ctz64(word))
                word &= word - 1
        return out

    def to_bytes(self):
        """Bit ``i`` is bit ``i % 8`` of byte ``i // 8``; length ceil(size/8)."""
        cdef Py_ssize_t nbytes = (self._size + 7) >> 3
        cdef bytearray out = bytearray(nbytes)
        cdef unsigned char *p = out
        cdef Py_ssize_t j
        cdef Py_ssize_t tail = self._size & 7
        for j in range(nbytes):
            p[j] = <unsigned char>(self._words[j >> 3] >> ((j & 7) << 3))
        if tail:
            p[nbytes - 1] &= <unsigned char>((1 << tail) - 1)
        return bytes(out)

    @classmethod
    def from_bytes(cls, size, data):
        """Inverse of ``to_bytes``.

        Raises BitmapError for a bad size, a wrong length or bits set past
        size; TypeError if ``data`` is not bytes-like.
        """
        cdef Py_ssize_t n = _check_size(size)
        cdef bytes raw = memoryview(data).tobytes()
        cdef Py_ssize_t nbytes = (n + 7) >> 3
        cdef Py_ssize_t tail = n & 7
        cdef const unsigned char *p
        cdef Py_ssize_t j, w, count = 0
        cdef Bitmap self
        if len(raw) != nbytes:
            raise BitmapError(f"bitmap of size {n} needs {nbytes} bytes, got {len(raw)}")
        p = raw
        if tail and p[nbytes - 1] >> tail:
            raise BitmapError(f"bits set past the end of a bitmap of size {n}")
        self = cls(n)
        for j in range(nbytes):
            self._words[j >> 3] |= (<uint64_t>p[j]) << ((j & 7) << 3)
        for w in range(self._nwords):
            count += coil_popcount64(self._words[w])
        tail = n & 63
        if tail:
            count -= 64 - tail  # padding bits
        self._count = count
        return self
