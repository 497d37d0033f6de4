"""Imports every built-in method module (each registers itself); the registry calls this once."""
from . import patchcore  # noqa: F401  (first: the baseline heads every list)
from . import ccad_v  # noqa: F401
from . import ccad_latent  # noqa: F401
from . import deco_diff  # noqa: F401
from . import d3ad  # noqa: F401
from . import glad  # noqa: F401
from . import feat_diff  # noqa: F401
