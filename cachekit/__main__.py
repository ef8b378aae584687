"""``python -m cachekit`` (bench, --version): the same command line as the ``cachekit`` script."""

from cachekit.cli import main

raise SystemExit(main())
