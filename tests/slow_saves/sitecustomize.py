"""Put on PYTHONPATH by the reliability tests that must stop a run in the middle of a save.

With TUNESMITH_SLOW_SAVE=<seconds> set, every completion marker is written that much later, so a
checkpoint's files sit in their temporary folder, unmarked, long enough to kill the process there.
"""

import os
import time

_DELAY = float(os.environ.get("TUNESMITH_SLOW_SAVE") or 0)

if _DELAY:
    from tunesmith import run_folder

    _write_marker = run_folder._write_marker

    def _slow_write_marker(*args, **kwargs):
        time.sleep(_DELAY)
        _write_marker(*args, **kwargs)

    run_folder._write_marker = _slow_write_marker
