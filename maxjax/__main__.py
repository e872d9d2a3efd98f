"""``python -m maxjax``: the ``maxjax`` command."""

import sys

from maxjax.cli import main

sys.exit(main())
