"""Shared pytest set-up: pick the hypothesis profile.

"ci" (thorough, derandomized) when the environment variable CI is set, else
"dev" (quick); an explicit HYPOTHESIS_PROFILE wins. See
`jacobprop.testing.profiles`.
"""

from jacobprop.testing import load_profile

load_profile()
