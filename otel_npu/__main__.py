"""``python -m otel_npu`` is the ``otel-npu`` command."""

import sys

from .cli import main

sys.exit(main())
