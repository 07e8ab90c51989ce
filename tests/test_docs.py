"""The README and docs/ stay navigable: every relative link resolves (a file that exists, and a
heading that exists for an #anchor), the README stays a front page, and it maps every page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

# [text](target) and ![alt](target), with an optional "title"; the text may be empty once
# inline code has been taken out.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, markup and punctuation dropped,
    lower case, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text()):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    out = []
    for line in _prose_lines(page.read_text()):
        out += LINK.findall(re.sub(r"``[^`]*``|`[^`]*`", "", line))
    return out


def test_the_slug_is_githubs():
    assert slug("Stopping, preemption and requeue") == "stopping-preemption-and-requeue"
    assert slug("The paper's claims, measured") == "the-papers-claims-measured"
    assert slug("Loader speed: `benchmarks/loader.py`") == "loader-speed-benchmarksloaderpy"
    assert slug("Fine-tuning at a higher resolution, and transfer") == "fine-tuning-at-a-higher-resolution-and-transfer"


def test_links_are_found_outside_code_only(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("see [a](a.md#x) and ![b](img/b.png)\n```bash\n[c](c.md)\n```\n"
                    "`[d](d.md)` and [`e.json`](../e.json \"title\")\n")
    assert links(page) == ["a.md#x", "img/b.png", "../e.json"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "just demo " in readme and "just test " in readme


def test_the_readme_maps_every_docs_page():
    readme_links = set(links(ROOT / "README.md"))
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme_links]
    assert not missing, f"pages not in the README's map of the docs: {missing}"


def test_every_flag_of_every_command_is_in_the_cli_reference():
    """docs/cli.md's synopsis cannot drift from the commands: each command and each of its
    flags appears there."""
    import typer.main

    from fastdeit.cli.commands import app

    doc = (ROOT / "docs" / "cli.md").read_text()
    missing = [f"{name} {opt}" for name, cmd in typer.main.get_command(app).commands.items()
               for p in cmd.params for opt in p.opts if opt.startswith("--") and opt not in doc]
    missing += [name for name in typer.main.get_command(app).commands if f"fastdeit {name}" not in doc]
    assert not missing
