import sys

from symstitch.cli import main

sys.exit(main())
