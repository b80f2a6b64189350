"""Address bitmaps: the Cython extension, or its pure-Python twin.

API (both backends, see ``coil/_bitmap_py.py`` for the reference):
``Bitmap(size)``, ``allocate(hint=0) -> int`` (lowest free at or after
hint, wrapping; raises ``BitmapFull``), ``set(i)``, ``free(i)``,
``test(i)``, ``count()``, ``find_free(hint=0)`` (-1 when full),
``size``, ``to_bytes()``, ``Bitmap.from_bytes(size, data)``.
"""

from coil._backend import load

_mod, BACKEND = load("coil._fast.bitmap", "coil._bitmap_py")
Bitmap = _mod.Bitmap
BitmapFull = _mod.BitmapFull

__all__ = ["Bitmap", "BitmapFull", "BACKEND"]
