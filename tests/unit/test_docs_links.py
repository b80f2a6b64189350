"""Every relative link of README.md and docs/*.md points at a file that
exists and, with a #fragment, at a heading of that file (GitHub's anchors);
the README's documentation table lists every page of docs/; every page
says what it covers and links to another page (issue 15)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    out, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path):
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            yield from LINK.findall(line)


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file_part, _, frag = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_readme_lists_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md"))
               if f"](docs/{p.name})" not in readme]
    assert not missing, missing


def test_every_docs_page_says_what_it_covers_and_links_on():
    bad = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        head = "\n".join(page.read_text().splitlines()[:12])
        if "What this page covers" not in head:
            bad.append(f"{page.name}: no 'What this page covers' at the top")
        if not any(t.endswith(".md") or ".md#" in t for t in links(page)
                   if not re.match(r"[a-z]+://", t)):
            bad.append(f"{page.name}: links to no other page")
    assert not bad, "\n".join(bad)
