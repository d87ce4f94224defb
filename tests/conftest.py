"""Shared test settings.

In CI (CI=true) hypothesis draws the same examples every run, so a red build always points at
a change, never at the luck of the draw; locally it explores new examples each run.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
