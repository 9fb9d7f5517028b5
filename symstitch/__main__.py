"""``python -m symstitch``: the ``symstitch`` command."""

import sys

from symstitch.commands import main

sys.exit(main())
