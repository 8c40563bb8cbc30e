"""`python -m phitune` runs the same CLI as the `phitune` console script."""

from phitune.cli.main import main

main()
