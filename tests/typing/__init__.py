"""Code checked by ``mypy --strict`` in the gate (pyproject ``[tool.mypy] files``)."""
