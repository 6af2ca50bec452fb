#!/usr/bin/env python
"""A matrix-factorisation recommender in NumPy whose embedding tables take row-sparse gradients.

A thin wrapper: the code is in ``optkern.examples.recommender``. Run
``python examples/recommender.py --help`` for the options.
"""

import os
import sys

try:
    from optkern.examples.recommender import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.recommender import main

if __name__ == "__main__":
    sys.exit(main())
