"""The training tests' helpers, which moved to tests/support.py; test_distributed.py imports
them from here."""

from support import PYTHON, REPO, subprocess_env, tiny_config_file, write_cache

__all__ = ["PYTHON", "REPO", "subprocess_env", "tiny_config_file", "write_cache"]
