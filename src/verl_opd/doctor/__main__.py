"""``python -m verl_opd.doctor``: the same as ``verify_opd_implementation.py``."""

import sys

from verl_opd.doctor.cli import main

sys.exit(main())
