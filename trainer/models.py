"""Former name of trainer.registry_cli, kept while `make models|promote|rollback|sign` call
`python -m trainer.models`."""

import sys

from trainer.registry_cli import main

if __name__ == "__main__":
    sys.exit(main())
