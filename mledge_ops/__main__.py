"""`python -m mledge_ops ...` is the same as the `mledge` console script."""

from mledge_ops.cli import main

raise SystemExit(main())
