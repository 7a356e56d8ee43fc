"""The README code outside the test-kit section runs as written (that one has its own test)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
KIT_SECTION = re.compile(
    r"<!-- BEGIN checking-your-own-layer -->.*?<!-- END checking-your-own-layer -->", re.S
)


def python_blocks_outside_the_kit_section() -> list[str]:
    text = KIT_SECTION.sub("", README.read_text())
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_quick_start_and_gradient_checks_run_in_order():
    blocks = python_blocks_outside_the_kit_section()
    assert len(blocks) >= 2, "README lost its Quick start or Checking gradients example"
    namespace: dict = {}
    for number, block in enumerate(blocks):  # later blocks use earlier names, as a reader would
        # A pseudo file name: a block's line numbers are not README.md's.
        exec(compile(block, f"<README.md: block {number + 1}>", "exec"), namespace)
    assert namespace["J"].to_dense().shape == (8, 3, 4)
    assert namespace["report"].ok
