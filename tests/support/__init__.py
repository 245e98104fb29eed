"""Helpers shared by the test modules (models, the server, the deployment files); fixtures live in
``tests/conftest.py``. Test modules import these, never each other."""
