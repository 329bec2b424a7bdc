"""How a command runs: its one code path (session.py), the run log (run_log.py),
SIGTERM/SIGINT handling (stopping.py), progress lines (progress.py) and the
context each stage gets (run_context.py)."""
