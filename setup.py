"""Only the build step pyproject.toml cannot say: a wheel carries the launch scripts (launch/),
the DeepSpeed configs (ds_configs/) and the example run configs (configs/) as fedzero/_bundled/,
where fedzero.bundled finds them when fedzero is not run from a source checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLED_DIRS = ("launch", "ds_configs", "configs")      # = fedzero.bundled.BUNDLED_DIRS (a test checks)


class BuildWithBundled(build_py):
    def run(self):
        super().run()
        if self.editable_mode:                # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "fedzero" / "_bundled"
        for name in BUNDLED_DIRS:
            source = HERE / name
            if source.is_dir():               # absent when building from an sdist that lacks it
                shutil.copytree(source, target / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithBundled})
