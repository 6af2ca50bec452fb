#!/usr/bin/env python
"""A torch MLP trained with optkern.torch (optkern's kernels as torch.optim classes), beside the
same training with torch.optim.

A thin wrapper: the code is in ``optkern.examples.torch_mlp`` (so tests can import it). Run
``python examples/torch_mlp.py --help`` for the options. Needs torch: pip install "optkern[torch]".
"""

import os
import sys

try:
    from optkern.examples.torch_mlp import main
except ImportError:  # a source checkout with the extension built in place (src/optkern/_core*.so)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from optkern.examples.torch_mlp import main

if __name__ == "__main__":
    sys.exit(main())
