"""Maps the top-level folders to ``tritonrag.*`` and finds their packages; pyproject.toml holds the rest.

``server/``, ``export/``, ``clients/`` and ``deploy/`` are the packages ``tritonrag.server``, ...;
``model_repository/`` ships as ``tritonrag.model_repository`` (its ``config.pbtxt`` templates only).
Packages are found, not listed, so a new subpackage cannot miss the wheel. pyproject.toml cannot say
this: ``[tool.setuptools.packages.find]`` has no way to put found packages under a prefix.
"""

from setuptools import find_packages, setup

FOLDERS = ("server", "export", "clients", "deploy")

setup(
    package_dir={
        **{f"tritonrag.{folder}": folder for folder in FOLDERS},
        "tritonrag.model_repository": "model_repository",
    },
    packages=[
        *(f"tritonrag.{package}" for package in find_packages(include=[*FOLDERS, *(f"{f}.*" for f in FOLDERS)])),
        "tritonrag.model_repository",
    ],
)
