import sys

from autospa.cli.main import main

sys.exit(main())
