"""``python -m edgewise.runtime.cli``: the same as the ``edgewise`` command."""

import sys

from edgewise.runtime.cli.main import main

sys.exit(main())
