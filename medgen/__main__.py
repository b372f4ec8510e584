"""`python -m medgen` (and `torchrun -m medgen ...`) is the `medgen` command."""

from medgen.cli import main

main()
