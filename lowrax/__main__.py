"""`python -m lowrax ...`: the `lowrax` command, for environments without its script on the PATH."""

from lowrax.cli.main import command

command()
