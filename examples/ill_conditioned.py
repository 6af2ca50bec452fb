#!/usr/bin/env python
"""Gradient descent against Momentum and Nesterov on an ill-conditioned quadratic or the Rosenbrock function.

A thin wrapper: the code is in ``optkern.examples.ill_conditioned`` (so tests and ``python -m optkern demo``
can import it). Run ``python examples/ill_conditioned.py --help`` for the options.
"""

import os
import sys

try:
    from optkern.examples.ill_conditioned import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.ill_conditioned import main

if __name__ == "__main__":
    sys.exit(main())
