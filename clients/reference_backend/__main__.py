"""`python -m reference_backend`: the same as `advface-backend`."""

import sys

from reference_backend.cli import main

sys.exit(main())
