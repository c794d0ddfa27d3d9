"""Entry point of `python -m dataengine.ram` (see `dataengine.ram.convert`)."""

import sys

from dataengine.ram.convert import main

sys.exit(main())
