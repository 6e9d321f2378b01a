"""Small rules the trainer and serving share, kept in one place so they cannot drift apart:
how a URI is shown without its password, how a message is cut to one line, and how the
registry says that an alias holds no version."""
