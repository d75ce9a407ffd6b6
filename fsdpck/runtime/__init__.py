"""Running on ranks: the process group, collectives, phases and progress, the per-rank runner,
the ``-n`` launcher and failure drills."""
