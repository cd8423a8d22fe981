"""Package data that lives outside vtc/ in the repository, mapped into the installed package.

The embedded models (``assets/``) and the main job's configs and task manifests (``eval/configs``,
``eval/tasks``) stay at the top of the repository and install as ``vtc/_assets``,
``vtc/_eval/configs`` and ``vtc/_eval/tasks``; :mod:`vtc.resources` finds them (``importlib.resources``
in an installed package, the repository's folders in a checkout or an editable install). Whole
folders are shipped, so retrained models with other file names need no change here. Everything
else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

DATA = {"vtc._assets": "assets", "vtc._eval.configs": "eval/configs", "vtc._eval.tasks": "eval/tasks"}

setup(
    packages=find_packages(include=["vtc", "vtc.*"]) + list(DATA),
    package_dir=DATA,
    package_data={"vtc._assets": ["**/*"], "vtc._eval.configs": ["*.yaml"], "vtc._eval.tasks": ["*.yaml"]},
)
