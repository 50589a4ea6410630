"""The trio layer: listeners, one task per client, and the daemon's lifetime.

This is the only code that moves bytes; everything it does with them is
delegated to the sans-IO session and the dispatcher.
"""
