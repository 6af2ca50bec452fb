#!/usr/bin/env python
"""A small NumPy MLP (ReLU, softmax cross-entropy) trained on digits made in code, with every optimizer.

A thin wrapper: the code is in ``optkern.examples.mlp`` (so tests and ``python -m optkern demo``
can import it). Run ``python examples/mlp.py --help`` for the options.
"""

import os
import sys

try:
    from optkern.examples.mlp import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.mlp import main

if __name__ == "__main__":
    sys.exit(main())
