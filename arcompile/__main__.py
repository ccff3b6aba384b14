import sys

from arcompile.cli import main

sys.exit(main())
