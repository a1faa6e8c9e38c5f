# Gunicorn settings: the real file is in the package so the installed CLI and
# the container use the same one. Every value is overridable from the environment;
# see executor_service/gunicorn_config.py for the variables and their defaults.
from executor_service.gunicorn_config import *  # noqa: F403
from executor_service.gunicorn_config import child_exit, on_exit, on_starting, post_worker_init  # noqa: F401
