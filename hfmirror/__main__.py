"""``python -m hfmirror`` is the same as the ``hfmirror`` command."""

from .cli import main

main()
