"""``python -m service``: serve the API with waitress, configured from the environment.

Start-up failures print one sentence to stderr and exit 1. ``WEB_WORKERS`` > 1 runs that many
serving processes under a supervisor (``service.workers``); 1 serves from this process
(``service.server``, which also says what SIGTERM, SIGHUP and Ctrl-C do).
"""

from __future__ import annotations

import sys

from service.process import configured
from service.workers import supervise


def main() -> int:
    config = configured()
    if config is None:
        return 1
    if config.web_workers > 1:
        return supervise(config)
    from service.server import serve  # here, not at the top: a supervisor never loads onnxruntime

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
