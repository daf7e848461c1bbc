"""Every relative link of README.md, docs/*.md and the recipes' README.md files points at a file or folder
that exists (links to other sites and to anchors of the same page are not checked; an anchor after a path is
dropped)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+[\"'][^\"']*[\"'])?\s*\)")  # [text](target "title")


def pages() -> list[Path]:
    """The Markdown pages a reader follows links in."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted(ROOT.glob("recipes/*/README.md")),
    ]


def relative_targets(markdown: str) -> list[str]:
    """The relative link targets of `markdown`, anchors dropped, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and the page's own anchors
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """'page: target' (page relative to `root`) for each relative link of `page` to nothing that exists."""
    return [
        f"{page.relative_to(root)}: {target}"
        for target in relative_targets(page.read_text(encoding="utf-8"))
        if not (page.parent / target).exists()
    ]


def test_every_relative_link_points_at_a_file() -> None:
    assert (ROOT / "docs" / "usage.md") in pages() and (
        ROOT / "recipes" / "transfer_study" / "README.md"
    ) in pages()
    broken = [line for page in pages() for line in broken_links(page)]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_checker_finds_relative_links_and_skips_the_rest() -> None:
    text = (
        "See [usage](docs/usage.md#training), ![plot](plan.png 'x') and [site](https://example.com).\n"
        "[anchor](#status), `[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
        "[up](../x/README.md)\n"
    )
    assert relative_targets(text) == ["docs/usage.md", "plan.png", "../x/README.md"]


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# design\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[there](design.md), [up](../docs/design.md#x) and [gone](no_such_page.md)\n", encoding="utf-8"
    )
    assert broken_links(page, tmp_path) == ["docs/page.md: no_such_page.md"]
