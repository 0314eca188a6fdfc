"""`python -m tierserve.cli ...` runs the `tierserve` command."""

import sys

from tierserve.cli.main import main

sys.exit(main())
