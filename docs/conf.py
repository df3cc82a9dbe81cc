"""Sphinx configuration of the executorkit documentation (built by tests/test_docs.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "executorkit"
author = "executorkit developers"
copyright = "executorkit developers"  # noqa: A001 - Sphinx's name

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# Notebooks are rendered with the outputs of the test suite's run (tests/test_docs.py puts
# the executed copies in place); a plain build shows them without outputs. Never executed
# here: the build must stay fast and must not need a cluster.
nb_execution_mode = "off"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_numpy_docstring = True
html_theme = "alabaster"
html_title = "executorkit"
suppress_warnings = ["myst.header"]
