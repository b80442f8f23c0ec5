"""``python -m siterecovery`` is the ``siterecovery`` command."""

from siterecovery.cli.main import main

if __name__ == "__main__":
    main()
