"""The jaxarith training program: ``python -m train CONFIG.yaml [key=value ...]``.

Exit codes of ``python -m train`` / ``jaxarith train``: 0 done (or already done); 2 a config or
user error (one line on stderr, ``{"error": ...}`` under ``--json``); :data:`EXIT_PREEMPTED`
(75, ``EX_TEMPFAIL``) stopped by SIGTERM after saving a checkpoint: run the same command again to
resume (schedulers requeue it; the grow loop and experiments treat it as "resume later");
:data:`EXIT_INTERRUPTED` (130) stopped by Ctrl-C (a checkpoint is saved when it came during
training). In Python, ``run()`` returns ``status`` ``preempted`` / ``interrupted`` instead.
"""

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C
