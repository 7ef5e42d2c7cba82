"""``python -m keisei_stream.cli ...`` is ``keisei ...``."""

import sys

from keisei_stream.cli.main import main

sys.exit(main())
