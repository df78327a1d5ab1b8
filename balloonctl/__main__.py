"""Allow ``python -m balloonctl``."""

from balloonctl.cli import main

raise SystemExit(main())
