"""`python -m steprun`: the same as the `steprun` console script."""
from steprun.cli import main

main()
