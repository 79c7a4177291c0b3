"""Sphinx configuration of the lightly-cotap documentation.

Build from the repository root with
``sphinx-build -W -b html docs/source docs/build/html`` (warnings are errors).
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Document the source tree this file belongs to, also without an installed copy.
sys.path.insert(0, os.path.abspath("../.."))

import lightly_cotap  # noqa: E402

project = "lightly-cotap"
author = "lightly-cotap contributors"
copyright = "lightly-cotap contributors"
release = lightly_cotap.__version__
version = release
master_doc = "index"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Lightly's napoleon settings: Google docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_include_private_with_doc = False
napoleon_include_special_with_doc = False
napoleon_use_admonition_for_examples = False
napoleon_use_admonition_for_notes = False
napoleon_use_admonition_for_references = False
napoleon_use_ivar = False
napoleon_use_param = False
napoleon_use_rtype = False

# The ``__init__`` docstring ("Initializes ..." with its ``Args:``) is shown after
# the class docstring.
autoclass_content = "both"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}
# An override without a docstring shows none, not torch's (e.g. Module.forward).
autodoc_inherit_docstrings = False

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "Dense self-supervised learning for Lightly"}


def _skip_named_tuple_fields(
    app: Any, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    # A NamedTuple's fields are documented by its ``Attributes:`` section; autodoc
    # would document them a second time from their "Alias for field number N".
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app: Any) -> None:
    app.connect("autodoc-skip-member", _skip_named_tuple_fields)
