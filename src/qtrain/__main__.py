"""``python -m qtrain``: the ``qtrain`` command line, as torchrun starts it on every rank
(``torchrun --nproc-per-node N -m qtrain train --distributed ddp ...``)."""

import sys

from qtrain.cli import main

sys.exit(main())
