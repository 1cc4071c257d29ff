"""Puts this folder on ``sys.path``, so that a test in any folder can ``from support import``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
