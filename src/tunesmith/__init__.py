"""tunesmith: supervised fine-tuning of language models."""

import time

__version__ = "0.1.0"

# The first moment tunesmith code runs in a process, the start a command counts from where the
# process's own start cannot be read (env.seconds_since_start).
IMPORTED = time.monotonic()
