"""`python -m tierserve.benchmarks.tiers --worker --spec FILE`: one measured path's subprocess."""

import sys

from tierserve.benchmarks.tiers.run import main

sys.exit(main())
