#!/usr/bin/env python
"""Logistic regression on sparse features: Adagrad, RMSprop and Adam against plain SGD at an equal budget.

A thin wrapper: the code is in ``optkern.examples.sparse_logistic`` (so tests and ``python -m optkern demo``
can import it). Run ``python examples/sparse_logistic.py --help`` for the options.
"""

import os
import sys

try:
    from optkern.examples.sparse_logistic import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.sparse_logistic import main

if __name__ == "__main__":
    sys.exit(main())
