"""Package discovery under the `kiln` import name, which pyproject's find tables cannot add.

The repository root holds kiln's packages under their own folder names (compiler/, passes/,
codegen/, runtime/, models/) and api/ holds the top-level `kiln` module. Every package found in
those folders installs as kiln.<folder>..., so a new subpackage needs no packaging edit; the
rest of the configuration is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = ("compiler", "passes", "codegen", "runtime", "models")

setup(
    packages=["kiln", *(f"kiln.{p}" for p in find_packages(
        include=[pattern for root in ROOTS for pattern in (root, f"{root}.*")]))],
    package_dir={"kiln": "api", **{f"kiln.{root}": root for root in ROOTS}},
)
