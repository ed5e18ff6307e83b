"""`python -m mledge_devstack.demo`."""

import sys

from mledge_devstack.demo.run import main

sys.exit(main())
