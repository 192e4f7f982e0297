"""The WSGI entry point: gunicorn -c gunicorn.conf.py wsgi:app"""
import sys

from app import create_app
from config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"configuration error: {exc}")
