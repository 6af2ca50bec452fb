#!/usr/bin/env python
"""Muon (hidden matrices) with AdamW (the rest) on a transformer-shaped NumPy MLP, against Adam.

A thin wrapper: the code is in ``optkern.examples.muon_mlp``. Run
``python examples/muon_mlp.py --help`` for the options.
"""

import os
import sys

try:
    from optkern.examples.muon_mlp import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.muon_mlp import main

if __name__ == "__main__":
    sys.exit(main())
