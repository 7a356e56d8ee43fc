"""Hypothesis profiles for jacobprop's own tests and for users' test suites.

"dev" is quick, for the edit-test loop; "ci" is thorough and reproducible
(`derandomize=True`: the same examples on every run, so a red CI run is red
again on a laptop). Neither has a deadline: timing belongs in benchmarks, and
a slow shared runner must not turn a correct test red.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["register_profiles", "load_profile", "PROFILES"]

#: The settings of every profile `register_profiles` registers, by name.
PROFILES: dict[str, dict] = {
    "dev": {
        "max_examples": 12,
        "deadline": None,
        "print_blob": True,
    },
    "ci": {
        "max_examples": 40,
        "deadline": None,
        "derandomize": True,
        "print_blob": True,
        # Examples are built with numpy from drawn seeds; on a loaded 2-core
        # runner generation can be slow without anything being wrong.
        "suppress_health_check": [HealthCheck.too_slow],
    },
}


def register_profiles() -> None:
    """Register the "dev" and "ci" hypothesis profiles (idempotent).

    Notes
    -----
    "dev": 12 examples per test, no deadline. "ci": 40 examples per test,
    `derandomize=True`, no deadline, the too-slow health check off. Select one
    with `hypothesis.settings.load_profile(name)` or with `load_profile()`.
    """
    for name, options in PROFILES.items():
        settings.register_profile(name, **options)


def load_profile(environ=None) -> str:
    """Register the profiles and load the one the environment asks for; return its name.

    `HYPOTHESIS_PROFILE` wins when set; otherwise "ci" when the variable `CI`
    is set to anything but "", "0" or "false", else "dev".
    """
    environ = os.environ if environ is None else environ
    register_profiles()
    name = environ.get("HYPOTHESIS_PROFILE")
    if not name:
        ci = environ.get("CI", "").strip().lower()
        name = "ci" if ci not in ("", "0", "false") else "dev"
    settings.load_profile(name)
    return name
