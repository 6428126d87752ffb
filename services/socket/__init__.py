"""The websocket gateway: one pod's subscription, history, hub and client sessions."""
