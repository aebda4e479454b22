"""`python -m gateway` = `nld-gateway`."""

from .cli import main

raise SystemExit(main())
