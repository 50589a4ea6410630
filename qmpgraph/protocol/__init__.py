"""Sans-IO QMP: bytes in, messages out.

Nothing here performs I/O or imports trio; the server feeds bytes in and
writes the bytes that come out. ``qjson`` writes JSON exactly as QEMU's
QObject serializer does; ``session`` holds one client's QMP state.
"""
