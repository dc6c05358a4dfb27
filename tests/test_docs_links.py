"""The README and docs/ pages: every relative link resolves to a file of the checkout (and an anchor to a heading of
it), and every repository path they name in code (`benchmarks/bench.py`, `tests/test_cuda.py`, ...) exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "probes" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"<!--.*?-->", flags=re.DOTALL)  # notes to maintainers, not rendered
# a path into the checkout's own folders, as commands and prose name them
REPO_PATH = re.compile(r"\b((?:benchmarks|docs|examples|modeling|configuration|processing|src|tests)/[\w./-]*\w)")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links_of(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", COMMENT.sub("", page.read_text())))


def test_the_pages_exist_and_the_readme_links_every_docs_page():
    readme_links = {Path(target.split("#")[0]).name for target in links_of(ROOT / "README.md")}
    own_pages = {"packed-forward.md", "checkpoints.md", "vlm.md", "small-batches.md", "encode.md", "training.md",
                 "results.md", "layout.md"}  # fmt: skip
    assert own_pages <= {page.name for page in PAGES}
    assert own_pages <= readme_links, sorted(own_pages - readme_links)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links_of(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not files of the checkout
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors_of(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_repository_path_named_exists(page):
    # Paths in prose and commands alike, e.g. `python3 benchmarks/probes/graph_new_grids.py`; relative to the
    # repository root, as the commands run from there.
    text = re.sub(r"\]\([^)]*\)", "]", COMMENT.sub("", page.read_text()))  # link targets: the test above's
    missing = sorted({path for path in REPO_PATH.findall(text) if not (ROOT / path).exists()})
    assert not missing, f"{page_id(page)} names {missing}"


def test_the_anchor_rule_is_githubs():
    assert github_anchor(" Speed up a transformers VLM: `replace_vision_towers`") == (
        "speed-up-a-transformers-vlm-replace_vision_towers"
    )
    assert github_anchor("Small batches, VLM, encode") == "small-batches-vlm-encode"
