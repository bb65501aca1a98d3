"""``python -m verl_opd.tools.doctor``: the same as ``verify_opd_implementation.py``."""

import sys

from verl_opd.tools.doctor.cli import main

sys.exit(main())
