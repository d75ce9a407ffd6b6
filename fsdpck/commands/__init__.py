"""One function per command: options in, a result with an ``exit_code`` out. No printing here."""
