"""A strict stand-in for Google Cloud Pub/Sub in front of the emulator (see standin.py)."""
