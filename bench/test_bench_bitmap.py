"""Bitmap benchmark: allocate+free cycles on a 2**14-bit map that is 90% full.

Run: ``pytest bench/test_bench_bitmap.py --benchmark-only``. Each benchmarked
call runs ``CYCLES`` cycles ``free(allocate(hint))`` with random hints, so the
map's state never changes and every call does the same work. Two layouts:
``scattered`` (the 10% free bits spread at random: short searches) and
``clustered`` (one free run per 1024-bit region: searches cross many words).
The last test times both backends itself and prints the speedup.
"""

from __future__ import annotations

import importlib
import os
import random
import time

import pytest

FAST = "coil._fast.bitmap"
PURE = "coil._bitmap_py"
SIZE = 2 ** 14
CYCLES = 1000
LAYOUTS = ["scattered", "clustered"]


def import_backend(name: str):
    """Import a backend by name; skip (or fail with COIL_REQUIRE_FAST=1) if missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if name != FAST:
            raise
        if os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0"):
            pytest.fail(f"COIL_REQUIRE_FAST=1 but {FAST} is not importable: {exc}")
        pytest.skip(f"{FAST} is not built ({exc}); cythonize -i -3 coil/_fast/bitmap.pyx")


def used_bits(layout: str) -> list[int]:
    """90% of SIZE, deterministic."""
    rng = random.Random(14)
    if layout == "scattered":
        free = set(rng.sample(range(SIZE), SIZE // 10))
    else:
        free = set()
        for region in range(0, SIZE, 1024):
            start = region + rng.randrange(1024 - 102)
            free.update(range(start, start + 102))
    return [i for i in range(SIZE) if i not in free]


def hints(seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(SIZE) for _ in range(CYCLES)]


def make_map(mod, layout: str):
    bm = mod.Bitmap(SIZE)
    for i in used_bits(layout):
        bm.set(i)
    assert 0.89 < bm.count() / SIZE < 0.91
    return bm


def cycles(bm, hint_list) -> None:
    alloc, free = bm.allocate, bm.free
    for h in hint_list:
        free(alloc(h))


def cycles_recorded(bm, hint_list) -> list[int]:
    alloc, free = bm.allocate, bm.free
    out = []
    for h in hint_list:
        i = alloc(h)
        free(i)
        out.append(i)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", [FAST, PURE], ids=["cython", "python"])
def test_allocate_free_cycle(benchmark, backend, layout):
    mod = import_backend(backend)
    bm = make_map(mod, layout)
    before = bm.to_bytes()
    hint_list = hints()
    benchmark.group = f"bitmap-allocate-free-{layout}"
    benchmark.extra_info["cycles_per_call"] = CYCLES
    benchmark(cycles, bm, hint_list)
    assert bm.to_bytes() == before             # every cycle undid itself
    assert bm.count() == len(used_bits(layout))


def _best_time(bm, hint_list, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        cycles(bm, hint_list)
        best = min(best, time.perf_counter() - t0)
    return best


def test_speedup_report(benchmark, capsys):
    """Times both backends (best of several runs, no timing assertion) and
    prints cycles/s and the ratio; asserts only that results are identical."""
    fast = import_backend(FAST)
    pure = import_backend(PURE)
    hint_list = hints(seed=99) * 5             # 5000 cycles per run

    def measure():
        report = {}
        for layout in LAYOUTS:
            maps = {"cython": make_map(fast, layout), "python": make_map(pure, layout)}
            got = {name: cycles_recorded(bm, hint_list) for name, bm in maps.items()}
            assert got["cython"] == got["python"]
            assert maps["cython"].to_bytes() == maps["python"].to_bytes()
            secs = {name: _best_time(bm, hint_list, repeat=7) for name, bm in maps.items()}
            report[layout] = {name: len(hint_list) / s for name, s in secs.items()}
        return report

    benchmark.group = "bitmap-speedup-report"
    report = benchmark.pedantic(measure, rounds=1, iterations=1)
    lines = []
    for layout, ops in report.items():
        ratio = ops["cython"] / ops["python"]
        benchmark.extra_info[f"{layout}_speedup"] = round(ratio, 2)
        lines.append(f"bitmap {layout:9s}: cython {ops['cython']:>12,.0f} cycles/s, "
                     f"python {ops['python']:>10,.0f} cycles/s, cython/python = {ratio:.1f}x")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
