"""python -m qformat.tune: qtune."""
from .cli import main

main()
