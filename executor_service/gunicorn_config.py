"""The executor's gunicorn settings, kept at this path for ``gunicorn.conf.py``, the image
and scripts that name it; the real file is ``executor/gunicorn_config.py``."""

from executor_service.executor.gunicorn_config import *  # noqa: F403
from executor_service.executor.gunicorn_config import (  # noqa: F401
    child_exit,
    on_exit,
    on_starting,
    post_worker_init,
)
