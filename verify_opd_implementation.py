#!/usr/bin/env python
"""Pre-flight checks for a verl-opd run: a thin wrapper around :func:`verl_opd.tools.doctor.main`.

    python verify_opd_implementation.py --student PATH --teacher PATH [--selftest] [hydra overrides...]

Same checks as ``verl-opd doctor``; exit code 1 when any check FAILs.
"""

import sys

from verl_opd.tools.doctor import main

if __name__ == "__main__":
    sys.exit(main())
