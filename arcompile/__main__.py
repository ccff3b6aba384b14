import sys

from arcompile.cli.main import main

sys.exit(main())
