#!/usr/bin/env python
"""Train a Thermodynamic Gated Network on MQAR, modular addition or byte-level text.

python train.py                          # TGN on MQAR, CPU-friendly default
python train.py --task modadd            # grokking, with specific heat per eval
python train.py --task text --data DIR   # byte-level language modelling
python train.py --help
"""

import sys

from tgn_jax.training.cli import main

if __name__ == "__main__":
  sys.exit(main())
