"""Every python code block in docs/ runs, in order within its file, as a reader would run it."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_the_docs_are_there():
    assert {page.name for page in PAGES} >= {"design.md", "tutorial.md", "extending.md"}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_python_block_runs(page, capsys):
    blocks = python_blocks(page)
    assert blocks, f"{page.name} lost its code"
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(blocks):
        # Later blocks use the names earlier ones define; a failure names the block.
        code = compile(block, f"{page}:block {number + 1}", "exec")
        exec(code, namespace)
    capsys.readouterr()  # the tutorial prints a trace; keep the test output quiet


def prose(text: str) -> str:
    """`text` without its fenced code blocks (`layer[1](x)` in code is no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_links_stay_inside_the_repository(page):
    root = DOCS.parent
    for target in re.findall(r"\]\(([^)#\s]+)", prose(page.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).resolve().is_relative_to(root), target
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_points_only_inside_the_repository():
    readme = DOCS.parent / "README.md"
    text = readme.read_text()
    assert "../" not in text, "the README sends readers outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"[a-z]+://", target):
            assert (readme.parent / target).exists(), f"README links to missing {target}"
    assert "(docs/design.md)" in text


def test_design_names_every_registered_layer():
    import jacobprop as jp

    text = (DOCS / "design.md").read_text()
    missing = [name for name in jp.LAYERS if not re.search(rf"`{name}[`(]", text)]
    assert not missing, f"design.md does not describe the registered layers {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_docs_use_the_operators_public_home(page):
    # Operators are imported as `jp.X` or from the package `jacobprop.jacobian`; the
    # module layout behind that package is not the docs' business.
    text = page.read_text()
    assert "jacobian_spatial" not in text
    assert "jacobian.py" not in text, "the operators live in the package jacobprop/jacobian/"
