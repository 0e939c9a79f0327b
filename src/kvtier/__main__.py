import sys

from kvtier.entrypoints.cli import main

sys.exit(main())
