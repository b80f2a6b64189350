"""Nothing compiled is tracked by git, and ``make clean`` deletes no tracked file."""

import os
import shlex
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tracked(*paths) -> list[str]:
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout")
    r = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--", *paths],
                       capture_output=True, check=True)
    return [p.decode() for p in r.stdout.split(b"\0") if p]


def test_no_compiled_file_is_tracked():
    compiled = []
    for path in _tracked():
        full = os.path.join(REPO, path)
        if path.endswith((".so", ".o", ".pyc")) or os.path.islink(full):
            compiled.append(path)
            continue
        try:
            with open(full, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    compiled.append(path)
        except FileNotFoundError:
            pass
    assert compiled == []


def test_make_clean_deletes_no_tracked_file():
    r = subprocess.run(["make", "-n", "-C", REPO, "clean"], capture_output=True, text=True,
                       check=True)
    removed, finds = [], []
    for line in r.stdout.splitlines():
        words = shlex.split(line)
        if words[:2] == ["rm", "-rf"] or words[:2] == ["rm", "-f"]:
            removed += words[2:]
        elif words[:1] == ["find"]:
            finds.append(words)
    assert removed, r.stdout
    assert "coil/_fast/hypercoil" in removed
    assert _tracked(*removed) == []
    for words in finds:          # find DIR -name PATTERN -delete
        assert "-delete" in words and "-name" in words
        pattern = words[words.index("-name") + 1]
        assert _tracked(f"{words[1]}/**/{pattern}", f"{words[1]}/{pattern}") == []
