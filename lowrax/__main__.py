"""`python -m lowrax ...`: the `lowrax` command, for environments without its script on the PATH."""

import sys

from lowrax.cli.main import main

sys.exit(main())
