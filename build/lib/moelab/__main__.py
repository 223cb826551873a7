"""`python -m moelab ...` is `moelab ...`."""
from moelab.cli import main

raise SystemExit(main())
