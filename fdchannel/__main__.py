"""``python -m fdchannel demo``."""

import sys

from ._demo import main

sys.exit(main(sys.argv[1:]))
