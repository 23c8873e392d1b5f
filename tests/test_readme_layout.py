"""The README's layout lists every module of the package and the launch scripts, one line each, and
nothing that is not there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_modules() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout\n"):]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    paths, stack = [], []
    for line in block.splitlines():
        assert len(line.split(maxsplit=1)) == 2, f"README layout line without a description: {line!r}"
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip(" "))) // 2
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name)
        else:
            paths.append("".join(stack) + name)
    return paths


def test_every_module_is_listed_once_and_every_listed_module_exists():
    listed = listed_modules()
    assert len(listed) == len(set(listed))
    tree = sorted(str(p.relative_to(ROOT)) for p in list((ROOT / "fedzero").rglob("*.py")) + list((ROOT / "launch").glob("*.py"))
                  if p.name != "__init__.py")
    assert sorted(listed) == tree
