"""python -m lipdp train ..."""

from lipdp.cli import main

raise SystemExit(main())
