"""`python -m mledge_devstack.demo`."""

import sys

from mledge_devstack.demo.cli import main

sys.exit(main())
