"""The tracking server's code: its start-up, the one-shot services around it and its backups."""
