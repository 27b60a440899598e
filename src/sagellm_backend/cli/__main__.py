"""``python -m sagellm_backend.cli``: the ``sagellm-backend`` command line."""

from __future__ import annotations

import sys

from sagellm_backend.cli import main

sys.exit(main())
