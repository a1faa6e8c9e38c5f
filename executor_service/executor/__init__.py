"""The executor: a Flask API that runs one model call per request, and its providers."""
