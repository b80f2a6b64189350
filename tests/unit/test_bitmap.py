"""One suite for both bitmap backends (Cython ``coil._fast.bitmap`` and
pure-Python ``coil._bitmap_py``), plus a state machine that checks them
against each other and a set model.

The Cython parametrisation skips when the extension is not built, and fails
instead when ``COIL_REQUIRE_FAST=1``.
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
    run_state_machine_as_test,
)

from coil.errors import BitmapError, CoilError

FAST = "coil._fast.bitmap"
PURE = "coil._bitmap_py"
BUILD_HINT = "build it with: cythonize -i -3 coil/_fast/bitmap.pyx"


def _require_fast() -> bool:
    return os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0")


def import_backend(name: str):
    """Import a backend module by name; skip (or fail) if the extension is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if name != FAST:
            raise
        if _require_fast():
            pytest.fail(f"COIL_REQUIRE_FAST=1 but {FAST} is not importable: {exc}")
        pytest.skip(f"{FAST} is not built ({exc}); {BUILD_HINT}")


@pytest.fixture(params=[FAST, PURE], ids=["cython", "python"])
def mod(request):
    return import_backend(request.param)


@pytest.fixture
def Bitmap(mod):
    return mod.Bitmap


@pytest.fixture
def fast():
    return import_backend(FAST)


@pytest.fixture
def pure():
    return import_backend(PURE)


SIZES = [1, 7, 8, 63, 64, 65, 127, 128, 129, 1000]


def fill(bm, indexes):
    for i in indexes:
        bm.set(i)
    return bm


# --- construction -------------------------------------------------------

@pytest.mark.parametrize("size", SIZES + [2 ** 20])
def test_new_bitmap_is_empty(Bitmap, size):
    bm = Bitmap(size)
    assert bm.size == size
    assert len(bm) == size
    assert bm.count() == 0
    assert bm.used() == []
    assert bm.find_free() == 0
    assert bm.to_bytes() == bytes((size + 7) // 8)


@pytest.mark.parametrize("size", [0, -1, -64])
def test_non_positive_size_rejected(Bitmap, size):
    with pytest.raises(BitmapError, match=str(size)):
        Bitmap(size)


def test_absurd_size_rejected(mod):
    with pytest.raises(BitmapError):
        mod.Bitmap(mod.MAX_SIZE + 1)


@pytest.mark.parametrize("size", [1.0, "8", None])
def test_non_integer_size_is_type_error(Bitmap, size):
    with pytest.raises(TypeError):
        Bitmap(size)


def test_size_is_read_only(Bitmap):
    bm = Bitmap(10)
    with pytest.raises(AttributeError):
        bm.size = 20
    assert bm.size == 10


# --- allocate / find_free -------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_allocate_in_order_until_full(Bitmap, size):
    bm = Bitmap(size)
    assert [bm.allocate() for _ in range(size)] == list(range(size))
    assert bm.count() == size
    assert bm.find_free() == -1
    assert bm.used() == list(range(size))
    with pytest.raises(BitmapError):  # BitmapFull is a BitmapError
        bm.allocate()


@pytest.mark.parametrize("size", SIZES)
def test_full_raises_bitmap_full_from_any_hint(mod, size):
    bm = fill(mod.Bitmap(size), range(size))
    for hint in {0, size // 2, size - 1}:
        with pytest.raises(mod.BitmapFull, match=f"size {size}"):
            bm.allocate(hint)
        assert bm.find_free(hint) == -1
    assert bm.count() == size


def test_bitmap_full_is_a_coil_error(mod):
    assert issubclass(mod.BitmapFull, BitmapError)
    assert issubclass(mod.BitmapFull, CoilError)


def test_both_backends_raise_the_same_class(fast, pure):
    assert fast.BitmapFull is pure.BitmapFull
    bm = fast.Bitmap(1)
    bm.allocate()
    with pytest.raises(pure.BitmapFull):
        bm.allocate()


def test_allocate_reuses_lowest_freed(Bitmap):
    bm = fill(Bitmap(100), range(100))
    bm.free(70)
    bm.free(30)
    assert bm.allocate() == 30
    assert bm.allocate() == 70
    assert bm.find_free() == -1


@pytest.mark.parametrize("size", [65, 200, 1000])
def test_hint_starts_search_and_wraps(Bitmap, size):
    bm = Bitmap(size)
    assert bm.allocate(size - 1) == size - 1
    assert bm.allocate(size - 1) == 0          # nothing after the hint: wrap
    assert bm.allocate(size - 1) == 1
    fill(bm, range(40, size - 1))
    assert bm.allocate(40) == 2                # all of 40.. used: wrap to lowest
    assert bm.allocate(5) == 5                 # hint itself free
    assert bm.allocate(5) == 6


def test_hint_skips_whole_used_words(Bitmap):
    bm = fill(Bitmap(1000), range(1, 900))
    assert bm.find_free(1) == 900
    assert bm.find_free(899) == 900
    assert bm.find_free(950) == 950
    bm.set(0)
    fill(bm, range(900, 1000))
    bm.free(3)
    assert bm.find_free(4) == 3                # found only after wrapping


@pytest.mark.parametrize("hint, expected", [(-1, 9), (-10, 0), (10, 0), (13, 3),
                                            (2 ** 70, 2 ** 70 % 10), (-(2 ** 70), -(2 ** 70) % 10)])
def test_out_of_range_hint_is_taken_modulo_size(Bitmap, hint, expected):
    bm = Bitmap(10)
    assert bm.find_free(hint) == expected
    assert bm.allocate(hint) == expected
    assert bm.test(expected)


def test_find_free_does_not_mark(Bitmap):
    bm = Bitmap(8)
    assert bm.find_free(3) == 3
    assert bm.find_free(3) == 3
    assert bm.count() == 0
    assert not bm.test(3)


def test_non_integer_hint_is_type_error(Bitmap):
    bm = Bitmap(8)
    with pytest.raises(TypeError):
        bm.allocate(1.5)
    with pytest.raises(TypeError):
        bm.find_free("1")
    assert bm.count() == 0


# --- set / free / test / count -------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_set_free_test_count(Bitmap, size):
    bm = Bitmap(size)
    last = size - 1
    bm.set(last)
    assert bm.test(last)
    assert bm.count() == 1
    bm.set(last)                               # idempotent
    assert bm.count() == 1
    bm.set(0)
    assert bm.test(0)
    assert bm.count() == (1 if size == 1 else 2)
    bm.free(last)
    assert not bm.test(last)
    bm.free(last)                              # idempotent
    assert bm.count() == (0 if size == 1 else 1)
    assert bm.used() == ([] if size == 1 else [0])


def test_free_of_free_bit_keeps_count(Bitmap):
    bm = Bitmap(16)
    bm.free(3)
    assert bm.count() == 0
    bm.set(4)
    bm.free(3)
    assert bm.count() == 1
    assert bm.used() == [4]


def test_test_returns_bool(Bitmap):
    bm = Bitmap(3)
    bm.set(1)
    assert bm.test(1) is True
    assert bm.test(0) is False


@pytest.mark.parametrize("method", ["set", "free", "test"])
@pytest.mark.parametrize("size, index", [(1, 1), (7, 7), (64, 64), (65, 65), (1000, 1000),
                                         (8, -1), (8, 2 ** 64), (8, -(2 ** 70))])
def test_out_of_range_index_rejected(Bitmap, method, size, index):
    bm = Bitmap(size)
    with pytest.raises(BitmapError) as info:
        getattr(bm, method)(index)
    assert not isinstance(info.value, IndexError)
    assert str(index) in str(info.value) and str(size) in str(info.value)
    assert bm.count() == 0
    assert bm.to_bytes() == bytes((size + 7) // 8)


def test_non_integer_index_is_type_error(Bitmap):
    bm = Bitmap(8)
    for method in (bm.set, bm.free, bm.test):
        with pytest.raises(TypeError):
            method(1.0)
    assert bm.count() == 0


def test_count_tracks_many_operations(Bitmap):
    bm = Bitmap(1000)
    fill(bm, range(0, 1000, 3))
    assert bm.count() == len(range(0, 1000, 3))
    for i in range(0, 1000, 6):
        bm.free(i)
    expected = sorted(set(range(0, 1000, 3)) - set(range(0, 1000, 6)))
    assert bm.count() == len(expected)
    assert bm.used() == expected


# --- serialisation ------------------------------------------------------

def test_to_bytes_bit_order(Bitmap):
    bm = fill(Bitmap(20), [0, 3, 8, 19])
    assert bm.to_bytes() == bytes([0b00001001, 0b00000001, 0b00001000])


@pytest.mark.parametrize("size", SIZES + [2 ** 14])
def test_round_trip(Bitmap, size):
    bm = fill(Bitmap(size), [i for i in range(size) if i % 3 == 0 or i == size - 1])
    data = bm.to_bytes()
    assert isinstance(data, bytes)
    assert len(data) == (size + 7) // 8
    copy_ = Bitmap.from_bytes(size, data)
    assert copy_ == bm
    assert copy_.count() == bm.count()
    assert copy_.used() == bm.used()
    assert copy_.to_bytes() == data
    # the copy keeps working: padding bits past size are never handed out
    while copy_.find_free() != -1:
        assert copy_.allocate() < size
    assert copy_.count() == size


@pytest.mark.parametrize("size", [7, 64, 65])
def test_from_bytes_full_map(Bitmap, size):
    data = bytearray(b"\xff" * ((size + 7) // 8))
    if size % 8:
        data[-1] = (1 << (size % 8)) - 1
    bm = Bitmap.from_bytes(size, data)         # bytearray accepted
    assert bm.count() == size
    assert bm.find_free() == -1


def test_from_bytes_accepts_memoryview(Bitmap):
    bm = Bitmap.from_bytes(16, memoryview(b"\x01\x80"))
    assert bm.used() == [0, 15]


@pytest.mark.parametrize("size, data", [(8, b""), (8, b"\x00\x00"), (9, b"\x00"),
                                        (64, bytes(7)), (65, bytes(8)), (1, b"\x00\x00")])
def test_from_bytes_rejects_wrong_length(Bitmap, size, data):
    with pytest.raises(BitmapError, match=f"{len(data)}"):
        Bitmap.from_bytes(size, data)


@pytest.mark.parametrize("size, data", [(1, b"\x02"), (7, b"\x80"), (65, bytes(8) + b"\x02"),
                                        (12, b"\x00\x10")])
def test_from_bytes_rejects_bits_past_size(Bitmap, size, data):
    with pytest.raises(BitmapError, match="past"):
        Bitmap.from_bytes(size, data)


def test_from_bytes_rejects_bad_size_and_type(Bitmap):
    with pytest.raises(BitmapError):
        Bitmap.from_bytes(0, b"")
    with pytest.raises(TypeError):
        Bitmap.from_bytes(8, 1)


def test_pickle_and_copy(Bitmap):
    bm = fill(Bitmap(70), [1, 64, 69])
    for clone in (pickle.loads(pickle.dumps(bm)), copy.copy(bm), copy.deepcopy(bm)):
        assert type(clone) is type(bm)
        assert clone == bm
        clone.set(2)
        assert not bm.test(2)


# --- equality -------------------------------------------------------------

def test_equality(Bitmap):
    a, b = fill(Bitmap(70), [1, 69]), fill(Bitmap(70), [69, 1])
    assert a == b and not a != b
    b.set(2)
    assert a != b and not a == b
    assert Bitmap(70) != Bitmap(71)
    assert Bitmap(64) != Bitmap(65)            # same words, different size
    assert Bitmap(8) != b"\x00"


def test_bitmaps_are_unhashable(Bitmap):
    with pytest.raises(TypeError):
        hash(Bitmap(8))


# --- backend switch -----------------------------------------------------

@pytest.mark.parametrize("forced, expected", [("1", "python"), ("", "cython")])
def test_backend_switch(forced, expected):
    if expected == "cython":
        import_backend(FAST)
    env = dict(os.environ, COIL_PURE_PYTHON=forced)
    out = subprocess.run(
        [sys.executable, "-c",
         "import coil.bitmap as b, coil._bitmap_py as p;"
         "print(b.BACKEND, b.Bitmap is p.Bitmap, b.BitmapFull is p.BitmapFull)"],
        env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, str(expected == "python"), "True"]


# --- state machine: Cython vs pure vs a set ----------------------------

# indexes and hints: mostly valid, sometimes just outside, occasionally huge
INDEXES = st.one_of(st.integers(0, 1023), st.integers(-3, 1030),
                    st.integers(-(2 ** 70), 2 ** 70))


class BitmapMachine(RuleBasedStateMachine):
    """Runs the same operations on a Cython bitmap, a pure one and a set."""

    fast_mod = None
    pure_mod = None

    @initialize(size=st.sampled_from([1, 2, 7, 8, 63, 64, 65, 100, 130, 1000]))
    def create(self, size):
        self.size = size
        self.model: set[int] = set()
        self.maps = [self.fast_mod.Bitmap(size), self.pure_mod.Bitmap(size)]

    def _model_find(self, hint):
        hint %= self.size
        for i in list(range(hint, self.size)) + list(range(0, hint)):
            if i not in self.model:
                return i
        return -1

    def _each(self, name, *args):
        """Call ``name`` on both bitmaps; return (results, exception types)."""
        results, errors = [], []
        for bm in self.maps:
            try:
                results.append(getattr(bm, name)(*args))
                errors.append(None)
            except Exception as exc:  # compared below
                results.append(None)
                errors.append(type(exc))
        return results, errors

    def _valid(self, i):
        return 0 <= i < self.size

    @rule(hint=INDEXES)
    def allocate(self, hint):
        expected = self._model_find(hint)
        results, errors = self._each("allocate", hint)
        if expected == -1:
            assert errors == [self.pure_mod.BitmapFull] * 2
        else:
            assert errors == [None, None]
            assert results == [expected, expected]
            self.model.add(expected)

    @rule(hint=INDEXES)
    def find_free(self, hint):
        expected = self._model_find(hint)
        results, errors = self._each("find_free", hint)
        assert errors == [None, None]
        assert results == [expected, expected]

    @rule(i=INDEXES)
    def set(self, i):
        _, errors = self._each("set", i)
        if self._valid(i):
            assert errors == [None, None]
            self.model.add(i)
        else:
            assert errors == [BitmapError, BitmapError]

    @rule(i=INDEXES)
    def free(self, i):
        _, errors = self._each("free", i)
        if self._valid(i):
            assert errors == [None, None]
            self.model.discard(i)
        else:
            assert errors == [BitmapError, BitmapError]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free_used(self, data):
        i = data.draw(st.sampled_from(sorted(self.model)))
        for bm in self.maps:
            bm.free(i)
        self.model.discard(i)

    @rule(i=INDEXES)
    def test(self, i):
        results, errors = self._each("test", i)
        if self._valid(i):
            assert errors == [None, None]
            assert results == [i in self.model] * 2
        else:
            assert errors == [BitmapError, BitmapError]

    @rule(start=st.integers(0, 1000), length=st.integers(1, 1000))
    def set_run(self, start, length):
        """Fill a run of bits so that full and nearly full maps are reached."""
        start %= self.size
        for i in range(start, min(self.size, start + length)):
            for bm in self.maps:
                bm.set(i)
            self.model.add(i)

    @rule()
    def reload(self):
        data = [bm.to_bytes() for bm in self.maps]
        self.maps = [type(bm).from_bytes(self.size, d) for bm, d in zip(self.maps, data)]

    @invariant()
    def agree(self):
        if not hasattr(self, "model"):
            return
        expected = bytearray((self.size + 7) // 8)
        for i in self.model:
            expected[i >> 3] |= 1 << (i & 7)
        for bm in self.maps:
            assert bm.count() == len(self.model)
            assert bm.to_bytes() == bytes(expected)
            assert bm.size == self.size
        assert self.maps[0].used() == self.maps[1].used() == sorted(self.model)
        assert self.maps[0].find_free() == self.maps[1].find_free() == self._model_find(0)


def test_backends_agree_with_model(fast, pure):
    machine = type("Machine", (BitmapMachine,), {"fast_mod": fast, "pure_mod": pure})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=200, stateful_step_count=60, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
