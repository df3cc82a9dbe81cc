"""``python -m executorkit ...``: the same as the ``executorkit`` command."""

import sys

from executorkit.cli import main

sys.exit(main())
