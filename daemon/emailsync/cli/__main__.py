"""``python -m emailsync.cli``: the console script, as debian/rules and the tests run it."""

from emailsync.cli.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
