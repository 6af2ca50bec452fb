#!/usr/bin/env python
"""Linear regression trained with BGD, SGD and mini-batch GD against the closed-form least-squares solution.

A thin wrapper: the code is in ``optkern.examples.linear_regression`` (so tests and ``python -m optkern demo``
can import it). Run ``python examples/linear_regression.py --help`` for the options.
"""

import os
import sys

try:
    from optkern.examples.linear_regression import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.linear_regression import main

if __name__ == "__main__":
    sys.exit(main())
