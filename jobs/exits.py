"""The payload's exit codes: its side of the contract with the daemon (stdlib only, imported by both).

A remote payload also writes its code into ``progress.json`` (the daemon cannot see the process),
so these numbers are the whole vocabulary an attempt has to say how it ended.
"""

EXIT_OK = 0  # finished; the final adapter is committed
EXIT_FAILED = 1  # training failed (a bug, NaNs, out of memory): counts against max_failures
EXIT_BAD_INPUT = 2  # the spec or the data is unusable: the job fails, no retry
EXIT_SETUP_FAILED = 3  # this machine cannot run the payload (packages, no GPU): try another machine
EXIT_STORE_UNAVAILABLE = 69  # EX_UNAVAILABLE: the checkpoint store stayed unreachable; not the job's fault
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM; a checkpoint was saved and committed at the step reached
EXIT_STOPPED = 76  # the daemon's control object said stop (a budget cap): saved, committed, left
EXIT_FENCED = 77  # the job's lease names another attempt: this one stopped without writing anything more
